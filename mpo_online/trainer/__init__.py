"""Policy training on Ray Train + DeepSpeed: MPO / DPO / DPO+SFT on preference pairs, SFT / RFT on demonstrations.

    from mpo_online.trainer import train_policy, TrainResult

Modules: batching (rows -> prompt-masked model inputs), logps (fused per-sequence log-probs), worker (the Ray Train
train function), checkpointing (resumable checkpoints, Hugging Face export), launch (the driver: `train_policy`).
Importing this package is light: torch / ray / deepspeed load inside the functions that need them.
"""

from mpo_online.trainer.launch import OBJECTIVE_WEIGHTS, TrainResult, plan_steps, train_policy

__all__ = ["train_policy", "TrainResult", "plan_steps", "OBJECTIVE_WEIGHTS"]

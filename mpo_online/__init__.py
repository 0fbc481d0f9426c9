"""mpo-online: online Mixed Preference Optimization for (multimodal) LLMs on Ray.

Components (import the one you need; this package import stays light and pulls in no torch, ray or vllm):
config, records, tasks, data, verify, losses, trainer, pairs, rollout_pipeline, serve_client, weight_sync,
evaluate, run_state, report, warm_start, tiny_model. The recipe that wires them is jobs/online_mpo.py.
"""

__version__ = "0.1.0"

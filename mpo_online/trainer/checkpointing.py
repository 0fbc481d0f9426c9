"""Ray Train checkpoints of a DeepSpeed run, the Hugging Face export, and the finite-weights guard.

Runs inside the Ray Train workers (mpo_online.trainer.worker). A checkpoint directory, as Ray Train merges it from
the workers' local directories into `<storage_dir>/<run_name>/checkpoint_*`:

    trainer_state.json      rank 0: step, micro-batches consumed, delta state, per-step history, counters, done
    deepspeed/state/...     every rank: DeepSpeed engine state (module, optimizer partitions, lr scheduler)
    hf/                     final checkpoint only (rank 0): the trained policy as a Hugging Face checkpoint

Periodic checkpoints carry `deepspeed/` (exact resume: Adam moments, lr schedule, ZeRO partitions; same world size
and ZeRO stage required); the final one carries `hf/` and `done: true` instead, which is all a re-run of a finished
call needs. Every function that writes takes the engine and plain values; all collective ones must be called on
all ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

STATE_FILE = "trainer_state.json"
DS_DIR = "deepspeed"
DS_TAG = "state"
HF_DIR = "hf"


class NonFiniteWeightsError(RuntimeError):
    """The weights became NaN/inf; nothing was written."""


def new_local_dir() -> str:
    """A worker-local temporary directory to assemble one checkpoint in (Ray Train copies it to storage)."""
    return tempfile.mkdtemp(prefix="mpo-ckpt-")


def write_state(ckpt_dir: str, state: dict) -> None:
    tmp = os.path.join(ckpt_dir, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, os.path.join(ckpt_dir, STATE_FILE))


def read_state(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
        return json.load(f)


def all_finite(engine) -> bool:
    """Collective: True when every rank's weights are finite. Under ZeRO-3 each rank checks its own partition."""
    import torch
    import torch.distributed as dist

    bad = 0.0
    with torch.no_grad():
        for p in engine.module.parameters():
            t = getattr(p, "ds_tensor", None)  # ZeRO-3 partition; p itself is an empty placeholder
            t = p if t is None else t
            if t.numel() and not bool(torch.isfinite(t).all()):
                bad = 1.0
                break
    flag = torch.tensor([bad], dtype=torch.float32, device=engine.device)
    if dist.is_initialized():
        dist.all_reduce(flag)
    return float(flag.item()) == 0.0


def save_train_state(engine, state: dict, *, rank: int) -> str:
    """Collective: DeepSpeed engine state + trainer_state.json into a new local dir (returned)."""
    if not all_finite(engine):
        raise NonFiniteWeightsError(f"weights are non-finite at step {state.get('step')}; checkpoint not written")
    d = new_local_dir()
    engine.save_checkpoint(os.path.join(d, DS_DIR), tag=DS_TAG, save_latest=False)
    if rank == 0:
        write_state(d, state)
    return d


def load_train_state(engine, ckpt_dir: str) -> None:
    """Collective: restore module, optimizer and lr-scheduler state written by save_train_state."""
    path, _ = engine.load_checkpoint(os.path.join(ckpt_dir, DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")


def export_hf(engine, *, zero_stage: int, out_dir: str, rank: int) -> None:
    """Collective under ZeRO-3: write engine.module.model (the Hugging Face model) to out_dir on rank 0.

    ZeRO-3 gathers a full state dict on rank 0 (`_zero3_consolidated_16bit_state_dict`, all ranks must call it);
    its keys carry the PolicyLogps wrapper's "model." prefix, stripped here. Stages 0-2 hold full weights on every
    rank, so rank 0 saves its module directly.
    """
    if not all_finite(engine):
        raise NonFiniteWeightsError("weights are non-finite at the end of training; no policy was exported")
    hf_model = engine.module.model
    if zero_stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
            hf_model.save_pretrained(out_dir, state_dict=sd)
    elif rank == 0:
        hf_model.save_pretrained(out_dir)


def copy_for_report(src_dir: str) -> str:
    """A local copy of (the hf/ and state of) a finished run's checkpoint, to report it again on a re-run."""
    d = new_local_dir()
    if os.path.isdir(os.path.join(src_dir, HF_DIR)):
        shutil.copytree(os.path.join(src_dir, HF_DIR), os.path.join(d, HF_DIR))
    shutil.copy2(os.path.join(src_dir, STATE_FILE), os.path.join(d, STATE_FILE))
    return d

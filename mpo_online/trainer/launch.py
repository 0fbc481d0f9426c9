"""Driver side of a training call: `train_policy(...)` runs one Ray Train + DeepSpeed job and publishes the policy.

    import ray
    from mpo_online.trainer import train_policy
    ray.init(num_cpus=4)          # the caller owns Ray; phases (serve / data / train) run one at a time
    res = train_policy("runs/x/round_0/pairs.parquet", policy_dir="artifacts/tiny_vlm", out_dir="runs/x/policy_1",
                       objective="mpo", micro_batch_size=8, global_batch_size=16, lr=1e-4)
    res.policy_dir, res.metrics["reward_accuracy"], res.delta_state   # pass delta_state to the next round's call

Steps: read the pairs (a ray.data.Dataset or a parquet file/dir in the pair schema), keep the needed columns,
shuffle with `seed` and materialize with preserve_order (so every attempt sees the same micro-batch order, which
resume relies on); plan gradient accumulation and the step count; run `TorchTrainer(mpo_online.trainer.worker.
train_fn)`; copy the exported Hugging Face checkpoint from the final Ray Train checkpoint to `out_dir` (a temp dir
renamed into place, so `out_dir` is either absent or complete) together with the input policy's tokenizer /
processor files and an `mpo_train.json` record.

Resuming: Ray Train keeps checkpoints under `<storage_dir>/<run_name>`. Calling again with the same run_name and
storage_dir after a crash or kill resumes from the last checkpoint (same data, world size and ZeRO stage). A call
whose `out_dir` already holds a result of the same run_name returns that result without training.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

OBJECTIVE_WEIGHTS = {"mpo": (0.8, 0.2, 1.0), "dpo": (1.0, 0.0, 0.0), "dpo_sft": (1.0, 0.0, 1.0),
                     "sft": (0.0, 0.0, 1.0), "rft": (0.0, 0.0, 1.0)}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
RESULT_FILE = "mpo_train.json"


@dataclass
class TrainResult:
    policy_dir: str  # the new Hugging Face checkpoint directory (= out_dir)
    # Means over the run's optimizer steps of loss, loss_pref, loss_quality, loss_gen, reward_chosen,
    # reward_rejected, reward_margin, reward_accuracy, reward_mean, grad_norm (SFT: loss, loss_gen, grad_norm);
    # delta, delta_count, steps, total_steps, micro_batches, skipped_nonfinite, resumed_from_step, lr_last, tokens,
    # tokens_per_s(_per_worker), ref_tokens_per_s_per_worker; seconds: prep, startup (Ray Train until the train
    # function of the attempt that finished starts), init, ref, setup, train, checkpoint, teardown, fit, publish, total.
    metrics: dict
    delta_state: dict | None  # RewardBaseline.state_dict() after training; pass it to the next round
    history: list = field(default_factory=list)  # one dict per optimizer step (world means)
    run_name: str = ""
    checkpoint_path: str = ""  # the final Ray Train checkpoint (deleted when cleanup=True)


def plan_steps(n_rows: int, *, num_workers: int, micro_batch_size: int, global_batch_size: int,
               epochs: int) -> dict:
    """Gradient accumulation and step counts. Ray's equal split gives each worker n_rows // num_workers rows."""
    per_step = micro_batch_size * num_workers
    if global_batch_size % per_step:
        raise ValueError(f"global_batch_size ({global_batch_size}) must be a multiple of micro_batch_size x "
                         f"num_workers ({per_step})")
    grad_accum = global_batch_size // per_step
    rows_per_worker = n_rows // num_workers
    micro_per_epoch = math.ceil(rows_per_worker / micro_batch_size)
    total_steps = micro_per_epoch * epochs // grad_accum
    if total_steps < 1:
        raise ValueError(f"{n_rows} rows give no full optimizer step at global batch {global_batch_size} with "
                         f"{num_workers} workers; lower global_batch_size or add data")
    return {"grad_accum": grad_accum, "micro_per_epoch": micro_per_epoch, "total_steps": total_steps,
            "rows_per_worker": rows_per_worker}


def train_columns(columns, *, pairs: bool) -> list[str]:
    """The pair-schema columns training reads, of those present. The sampled token ids and engine log-probs are
    among them: without the ids the collator would re-tokenize the text (and append an end-of-turn token to a
    response the engine cut off), so the trainer would score a sequence other than the one sampled."""
    from mpo_online.data.records import TOKEN_COLUMNS

    want = ["pair_id", "prompt", "chosen", "images"] + (["rejected"] if pairs else []) + list(TOKEN_COLUMNS)
    missing = [c for c in ("prompt", "chosen") + (("rejected",) if pairs else ()) if c not in columns]
    if missing:
        raise ValueError(f"dataset lacks columns {missing} of the pair schema (mpo_online.data.records)")
    return [c for c in want if c in columns]


# a call's optimisation settings (train_policy's)
HYPER_KEYS = ("delta_mode", "delta_ema_decay", "lr", "weight_decay", "warmup_ratio", "epochs", "micro_batch_size",
              "global_batch_size", "zero_stage", "precision", "max_grad_norm", "max_nonfinite_steps",
              "logps_chunk_size", "max_length", "pref_span", "seed", "stop_loss", "stop_window")


def hyper_settings(**given) -> dict:
    """All HYPER_KEYS: `given` over train_policy's defaults (one place for the defaults); TypeError for other keys."""
    import inspect
    unknown = set(given) - set(HYPER_KEYS)
    if unknown:
        raise TypeError(f"unknown training settings {sorted(unknown)}; known: {HYPER_KEYS}")
    params = inspect.signature(train_policy).parameters
    return {k: given.get(k, params[k].default) for k in HYPER_KEYS}


def check_objective(objective: str, weights, *, zero_stage: int, precision: str) -> tuple[bool, tuple]:
    """-> (pair objective?, loss weights (w_pref, w_quality, w_gen)); ValueError for settings no worker can run."""
    if objective not in OBJECTIVE_WEIGHTS:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVE_WEIGHTS)}, got {objective!r}")
    if zero_stage not in (0, 1, 2, 3) or precision not in ("fp32", "bf16"):
        raise ValueError("zero_stage must be 0-3 and precision fp32 or bf16")
    pairs = objective not in ("sft", "rft")
    w = weights if (weights is not None and pairs) else OBJECTIVE_WEIGHTS[objective]
    return pairs, tuple(float(x) for x in w)


def worker_config(n_rows: int, *, policy_dir, ref_dir, objective: str, weights: tuple, beta: float, delta_state,
                  num_workers: int, worker_cpus: float, progress_file, hyper: dict, **extra) -> tuple[dict, dict]:
    """(the plain kwargs of worker.train_worker for one training call, the step plan). `hyper`: the optimisation
    settings (lr, batch sizes, epochs, ZeRO stage, ...) as train_policy names them; `extra`: more worker kwargs."""
    hyper = dict(hyper)
    global_batch_size = hyper.pop("global_batch_size", None) or hyper["micro_batch_size"] * num_workers
    plan = plan_steps(n_rows, num_workers=num_workers, micro_batch_size=hyper["micro_batch_size"],
                      global_batch_size=global_batch_size, epochs=hyper["epochs"])
    config = dict(
        policy_dir=str(Path(policy_dir).resolve()), ref_dir=str(Path(ref_dir).resolve()) if ref_dir else None,
        objective=objective, weights=weights, beta=beta, delta_state=delta_state, **hyper,
        grad_accum=plan["grad_accum"], total_steps=plan["total_steps"],
        # one intra-op thread per reserved CPU: the same float reductions (so the same result) whatever the machine's
        # core count, and two workers on two cores do not spin against each other
        torch_threads=max(1, int(worker_cpus)), progress_file=progress_file, **extra)
    return config, plan


def worker_scaling(num_workers: int, worker_cpus: float, worker_gpus: float, extra: dict | None = None):
    """Ray Train's ScalingConfig for `num_workers` workers reserving these CPUs / GPUs (+ `extra` custom
    resources, which pin them to the nodes offering them) each."""
    from ray.train import ScalingConfig
    resources = {"CPU": worker_cpus, **({"GPU": worker_gpus} if worker_gpus else {}), **(extra or {})}
    return ScalingConfig(num_workers=num_workers, use_gpu=worker_gpus > 0, resources_per_worker=resources)


def call_record(run_name: str, out_dir: Path, config: dict, metrics: dict, state: dict,
                checkpoint_path: str = "") -> dict:
    """What `<out_dir>/mpo_train.json` records of a training call (`_cached` reads it back). `config`: the worker
    kwargs (worker_config); `state`: the worker's final delta and per-step history."""
    return {"run_name": run_name, "policy_dir": str(out_dir), "parent_policy_dir": config["policy_dir"],
            "ref_dir": config["ref_dir"] or config["policy_dir"], "objective": config["objective"],
            "weights": config["weights"], "beta": config["beta"], "metrics": metrics, "delta_state": state["delta"],
            "history": state["history"], "checkpoint_path": checkpoint_path}


def worker_runtime_env() -> dict:
    """Workers import mpo_online by module path; make that work without an installed package too."""
    from mpo_online import pinned_cpu_env
    pkg_root = str(Path(__file__).resolve().parents[2])
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p),
                         **pinned_cpu_env()}}   # AVX2 kernels on every machine: see mpo_online/__init__.py


def prepare_dataset(dataset, *, pairs: bool, seed: int, shuffle: bool = True):
    """-> (materialized ray.data.Dataset with the columns training reads, row count)."""
    import ray.data

    if isinstance(dataset, (str, os.PathLike)):
        # One round's pairs fit in the driver; pyarrow + from_arrow takes ~0.1 s where read_parquet's file listing
        # and read tasks took 10-13 s for a 16-row file here (Ray 2.60, 2 cores).
        import pyarrow.parquet as pq
        dataset = ray.data.from_arrow(pq.read_table(str(dataset)))
    ds = dataset
    ds = ds.select_columns(train_columns(ds.columns(), pairs=pairs))
    if shuffle:
        ds = ds.random_shuffle(seed=seed)
    # Block order must not depend on task timing: the resume logic replays the same micro-batch sequence.
    ds.context.execution_options.preserve_order = True
    ds = ds.materialize()
    return ds, ds.count()


def _publish(hf_dir: str, *, policy_dir: str, out_dir: Path, record: dict) -> None:
    """Copy the exported model + the input policy's tokenizer/processor files into out_dir, atomically."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(hf_dir, tmp)
    publish_in_place(tmp, policy_dir=policy_dir, out_dir=out_dir, record=record)


def publish_in_place(tmp: Path, *, policy_dir: str, out_dir: Path, record: dict) -> None:
    """Complete the export in `tmp` (a sibling of out_dir) with the input policy's tokenizer/processor files and the
    record, then rename it to out_dir: out_dir is either absent or complete."""
    for f in Path(policy_dir).iterdir():
        if not f.is_file() or (tmp / f.name).exists() or f.name == RESULT_FILE:
            continue
        if f.name.endswith(_WEIGHT_SUFFIXES) or f.name in _WEIGHT_INDEXES:
            continue
        shutil.copy2(f, tmp / f.name)
    (tmp / RESULT_FILE).write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
    os.rename(tmp, out_dir)  # atomic; raises if out_dir appeared meanwhile


def _cached(out_dir: Path, run_name: str) -> TrainResult | None:
    rec_path = out_dir / RESULT_FILE
    if not out_dir.exists():
        return None
    if rec_path.exists():
        rec = json.loads(rec_path.read_text())
        if rec.get("run_name") == run_name:
            return TrainResult(**{k: rec[k] for k in ("policy_dir", "metrics", "delta_state", "history",
                                                      "run_name", "checkpoint_path")})
    raise FileExistsError(f"{out_dir} exists and is not the result of run {run_name!r}")


def train_policy(dataset, *, policy_dir, out_dir, ref_dir=None, objective: str = "mpo", weights=None,
                 beta: float = 0.1, delta_state: dict | None = None, delta_mode: str = "cumulative",
                 delta_ema_decay: float = 0.99, lr: float = 5e-6, weight_decay: float = 0.05,
                 warmup_ratio: float = 0.05, epochs: int = 1, micro_batch_size: int = 8,
                 global_batch_size: int | None = None, zero_stage: int = 0, precision: str = "fp32",
                 max_grad_norm: float = 1.0, max_nonfinite_steps: int = 3, logps_chunk_size: int = 1024,
                 max_length: int = 512, pref_span: str = "sequence", seed: int = 0,
                 stop_loss: float | None = None, stop_window: int = 20, num_workers: int = 2,
                 worker_cpus: float = 1.0, worker_gpus: float = 0.0, storage_dir=None, run_name: str | None = None,
                 checkpoint_every: int = 0, keep_checkpoints: int = 2, max_failures: int = 0,
                 shuffle: bool = True, cleanup: bool = True, _nan_on_micro_batches=(),
                 _fail_after_step: int | None = None) -> TrainResult:
    """Train `policy_dir` on `dataset` with Ray Train + DeepSpeed and publish the result as `out_dir`.

    objective: mpo | dpo | dpo_sft (pairs; `weights` = (w_pref, w_quality, w_gen), default per objective) or
        sft | rft (token-mean NLL of `chosen` only; no reference, `rejected` ignored).
    ref_dir: the frozen reference checkpoint; None = policy_dir (the policy at the start of this call).
    delta_state: the reward baseline carried from the previous call (None: start at 0); delta_mode cumulative
        (reference code: running mean of world-mean batch rewards) or ema (decay delta_ema_decay).
    global_batch_size: micro_batch_size * num_workers * gradient accumulation; None = micro_batch_size * num_workers.
    pref_span: what a pair's rewards sum over: "sequence" (the paper's), "first_diff_line" or
               "first_diff_token" (batching.py).
    checkpoint_every: optimizer steps between resumable Ray Train checkpoints (0: only the final one).
    max_failures: Ray Train restarts from the last checkpoint within this call. cleanup: delete the run's Ray Train
        storage after publishing. Test hooks: `_nan_on_micro_batches`; `_fail_after_step`: the last worker's
        process SIGKILLs itself after that step's checkpoint.
    The caller must have called ray.init(). Returns a TrainResult; raises RuntimeError when the job fails (the
    message says how to resume).
    """
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from mpo_online.trainer.progress import TRAIN_PROGRESS_FILE
    from mpo_online.trainer.worker import train_fn

    t_call = time.time()
    pairs, w = check_objective(objective, weights, zero_stage=zero_stage, precision=precision)
    out_dir = Path(out_dir).resolve()
    run_name = run_name or f"train-{out_dir.name}"
    storage_dir = str(Path(storage_dir or out_dir.parent / "ray_train").resolve())
    cached = _cached(out_dir, run_name)
    if cached is not None:
        return cached
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    ds, n_rows = prepare_dataset(dataset, pairs=pairs, seed=seed, shuffle=shuffle)
    config, plan = worker_config(
        n_rows, policy_dir=policy_dir, ref_dir=ref_dir, objective=objective, weights=w, beta=beta,
        delta_state=delta_state, num_workers=num_workers, worker_cpus=worker_cpus,
        progress_file=os.path.join(storage_dir, run_name, TRAIN_PROGRESS_FILE),  # steps done, for the console
        hyper=dict(delta_mode=delta_mode, delta_ema_decay=delta_ema_decay, lr=lr, weight_decay=weight_decay,
                   warmup_ratio=warmup_ratio, epochs=epochs, micro_batch_size=micro_batch_size,
                   global_batch_size=global_batch_size, zero_stage=zero_stage, precision=precision,
                   max_grad_norm=max_grad_norm, max_nonfinite_steps=max_nonfinite_steps,
                   logps_chunk_size=logps_chunk_size, max_length=max_length, pref_span=pref_span, seed=seed),
        checkpoint_every=checkpoint_every, nan_on_micro_batches=tuple(_nan_on_micro_batches),
        fail_after_step=_fail_after_step)
    prep_seconds = time.time() - t0

    trainer = TorchTrainer(
        train_fn,
        train_loop_config=config,
        scaling_config=worker_scaling(num_workers, worker_cpus, worker_gpus),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True),
                                            enable_shard_locality=False),
        run_config=RunConfig(name=run_name, storage_path=storage_dir,
                             checkpoint_config=CheckpointConfig(num_to_keep=max(1, keep_checkpoints)),
                             failure_config=FailureConfig(max_failures=max_failures),
                             worker_runtime_env=worker_runtime_env()),
    )
    t_fit = time.time()
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError carries the worker's traceback
        raise RuntimeError(f"training run {run_name!r} failed: {exc}\nCall train_policy again with run_name="
                           f"{run_name!r} and storage_dir={storage_dir!r} to resume from its last checkpoint.") from exc
    t_fit_end = time.time()
    fit_seconds = t_fit_end - t_fit
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name!r} ended without a final checkpoint")

    t0 = time.time()
    from mpo_online.trainer.checkpointing import HF_DIR, read_state
    with result.checkpoint.as_directory() as ckpt_dir:
        state = read_state(ckpt_dir)
        metrics = dict(state["metrics"])
        metrics.update(
            pairs=n_rows, prep_seconds=prep_seconds, fit_seconds=fit_seconds,
            startup_seconds=metrics["worker_start_time"] - t_fit,  # Ray Train: controller + worker group + imports
            teardown_seconds=t_fit_end - metrics["worker_done_time"],  # export + final report + shutdown
            grad_accum=plan["grad_accum"], num_workers=num_workers, objective=objective,
        )
        record = call_record(run_name, out_dir, config, metrics, state, checkpoint_path=result.checkpoint.path)
        _publish(os.path.join(ckpt_dir, HF_DIR), policy_dir=config["policy_dir"], out_dir=out_dir, record=record)
    metrics["publish_seconds"] = time.time() - t0
    metrics["total_seconds"] = time.time() - t_call
    if cleanup:
        shutil.rmtree(os.path.join(storage_dir, run_name), ignore_errors=True)
    return TrainResult(policy_dir=str(out_dir), metrics=metrics, delta_state=state["delta"],
                       history=state["history"], run_name=run_name, checkpoint_path=result.checkpoint.path)

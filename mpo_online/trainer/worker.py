"""The Ray Train train function: one DeepSpeed data-parallel worker of an MPO / DPO / SFT training call.

Launched by mpo_online.trainer.launch.train_policy through `TorchTrainer(train_fn, train_loop_config=kwargs)`;
`train_fn(config)` unpacks the plain kwargs of `train_worker`. The long-lived workers of a TrainerSession
(mpo_online.trainer.session) call `train_worker` once per round with their shard as rows (no Ray Train
checkpoints). Ray Train has already set up torch.distributed (gloo on CPU, NCCL on GPU); `deepspeed.initialize`
joins that process group.

What one call does, per worker:
 1. Resume: `ray.train.get_checkpoint()` (a re-run with the same run name + storage path) gives the last checkpoint:
    DeepSpeed state, step, micro-batches consumed, delta, history. A checkpoint marked `done` is reported again.
 2. Reference log-probs (pair objectives): the frozen reference checkpoint is loaded as a plain model, scores every
    pair of this worker's shard once (no grad), and is freed before the policy engine is built. The result is a
    {pair key: (ref_chosen_logp, ref_rejected_logp)} table; training looks pairs up by key, so a micro-batch never
    runs a second model. Recomputed (not stored) on resume: it costs one forward pass over the shard. With
    `engine_reference` (the reference sampled the pairs) the engine's sampling log-probs fill the table instead,
    and only the pairs they do not cover (Dropout-NTP, responses cut by max_length) go through that pass.
 3. Policy engine: deepspeed.initialize on PolicyLogps(model) with ZeRO stage 0-3, AdamW (torch implementation:
    no JIT build), weight decay on matrices only, linear warmup then cosine (LambdaLR), gradient clipping,
    gradient accumulation (micro_batch * workers * accumulation = global batch), fp32 or bf16.
 4. Micro-batches from `ray.train.get_dataset_shard("train")` in a deterministic order (preserve_order, fixed seed),
    a continuous stream over epochs; on resume the consumed ones are skipped (and their keys hashed and compared).
    For each: policy log-probs -> ONE all-reduce of [reward_mean, non-finite flag] -> if any worker saw a non-finite
    value, every worker drops the micro-batch (no backward, no step; counted; more than max_nonfinite_steps aborts)
    -> delta.update(world-mean reward) -> mpo_loss(delta=delta.value) -> backward -> engine.step().
    delta is updated per (kept) micro-batch before its loss, as the reference code does; with gradient
    accumulation 1 (the default shapes) that is once per optimizer step.
 5. Every `checkpoint_every` optimizer steps: a Ray Train checkpoint (weights checked finite first). At the end:
    the weights are checked finite, exported as a Hugging Face checkpoint (ZeRO-3 consolidated) and reported as
    the final checkpoint with the metrics.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time

STAT_KEYS = ("loss", "loss_pref", "loss_quality", "loss_gen", "reward_chosen", "reward_rejected", "reward_margin",
             "reward_accuracy", "reward_mean")


class NonFiniteLossError(RuntimeError):
    """More non-finite micro-batches than max_nonfinite_steps."""


def train_fn(config: dict) -> None:
    """Ray Train entry point."""
    train_worker(**config)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int) -> float:
    """lr multiplier for optimizer step `step` (0-based): linear warmup (never 0), then cosine towards 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _iter_rows(shard, batch_size: int):
    """Micro-batches of row dicts from a Ray Train dataset shard or (session jobs) a list of rows."""
    if isinstance(shard, list):
        for i in range(0, len(shard), batch_size):
            yield shard[i:i + batch_size]
        return
    for b in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=False, prefetch_batches=1):
        yield b.to_pylist()


def engine_ref_logps(rows: list, collate, *, batch_size: int) -> tuple[dict, list]:
    """Reference log-probs from the engine's sampling log-probs, where they are the reference's.

    Valid only when the reference policy is the one that sampled the responses (`mpo.reference: previous`): then
    sum(engine log-prob of each sampled token) = log pi_ref(y | x), the value the trainer's reference pass computes
    (tests/test_parity.py: mean |delta| ~5e-7 nats/token on the tiny default). A pair qualifies when both responses
    carry one log-prob per token id and the collator scores every one of those tokens (no max_length cut).
    Dropout-NTP rejected responses never qualify: their continuation was sampled without the image.
    Returns ({pair key: (ref chosen logp, ref rejected logp)}, rows left for the trainer's reference pass).
    """
    from mpo_online.trainer.batching import IGNORE_INDEX, row_key

    table, rest = {}, []
    for chunk in _iter_rows(rows, batch_size):
        batch = collate(chunk)
        scored = (batch.tensors["labels"] != IGNORE_INDEX).sum(1).tolist()   # (2B,) response tokens
        B = len(chunk)
        for j, row in enumerate(chunk):
            sides = [(row.get(f"{s}_token_ids"), row.get(f"{s}_logprobs"), scored[j + B * i],
                      batch.spans[j + B * i] if batch.spans else (0, None))     # the tokens the rewards sum over
                     for i, s in enumerate(("chosen", "rejected"))]
            if all(ids and lps and len(ids) == len(lps) == n for ids, lps, n, _ in sides):
                table[row_key(row)] = tuple(math.fsum(lps[a:b]) for _, lps, _, (a, b) in sides)
            else:
                rest.append(row)
    return table, rest


def compute_ref_logps(ref_dir, shard, collate, *, batch_size: int, chunk_size: int, device, dtype) -> tuple:
    """{pair key: (ref chosen logp, ref rejected logp)} over this worker's shard, and the tokens scored."""
    import gc

    import torch

    from mpo_online.trainer.logps import load_model, sequence_logps

    model = load_model(ref_dir, dtype=dtype, device=device)
    table, tokens = {}, 0
    with torch.no_grad():
        for rows in _iter_rows(shard, batch_size):
            b = collate(rows).to(device, dtype)
            lp, _, _ = sequence_logps(model, b.tensors, chunk_size)   # (2B,) chosen then rejected
            B = b.n_pairs
            for i, k in enumerate(b.keys):
                table[k] = (float(lp[i]), float(lp[B + i]))
            tokens += b.num_tokens
    del model
    gc.collect()
    return table, tokens


def _build_engine(policy_dir, *, lr, weight_decay, micro_batch_size, grad_accum, world, zero_stage, precision,
                  max_grad_norm, chunk_size, total_steps, warmup_steps):
    import importlib

    import deepspeed
    import torch

    from mpo_online.trainer.logps import PolicyLogps, load_model

    # DeepSpeed's torch backend JIT-compiles a shared-memory all-reduce on CPU (~100 s the first time) that only
    # `inference_all_reduce` uses; training collectives go through torch.distributed (gloo). Skip the build.
    # (`deepspeed.comm.torch` as an attribute is the torch package itself; go through importlib.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    module = PolicyLogps(load_model(policy_dir, dtype=torch.float32), chunk_size)
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]  # norms, biases
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world,
        "gradient_clipping": max_grad_norm,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                   "weight_decay": weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total_steps=total_steps, warmup_steps=warmup_steps))

    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=groups, config=ds_config,
                                           lr_scheduler=scheduler, dist_init_required=False)
    return engine


def _grad_norm(engine, zero_stage: int) -> float:
    """Global grad norm. Stage 0 (call after the boundary backward, before step): from the all-reduced .grad;
    ZeRO stages (call after step): the norm the ZeRO optimizer recorded."""
    if zero_stage == 0:
        sq = sum(float(p.grad.float().pow(2).sum()) for p in engine.module.parameters() if p.grad is not None)
        return math.sqrt(sq)
    g = engine.get_global_grad_norm()
    return float(g) if g is not None else float("nan")


def _policy_terms(engine, batch, ref_table: dict, *, pairs: bool, poison: bool) -> dict:
    """Policy forward on one micro-batch -> per-pair (B,) tensors the loss needs."""
    import torch
    sum_lp, nll, _ = engine(batch.tensors)        # (S,) each; S = 2B (chosen, then rejected) or B
    B = batch.n_pairs
    if pairs:
        ref = torch.tensor([ref_table[k] for k in batch.keys], dtype=sum_lp.dtype, device=sum_lp.device)  # (B, 2)
        t = {"pc": sum_lp[:B], "pr": sum_lp[B:], "chosen_nll": nll[:B], "ref_c": ref[:, 0], "ref_r": ref[:, 1]}
    else:
        t = {"chosen_nll": nll}
    if poison:  # test hook: this rank sees a NaN
        t["chosen_nll"] = t["chosen_nll"] + float("nan")
    return t


def _loss_below(history: list, stop_loss, window: int) -> bool:
    """Early stop: the mean world loss of the last `window` optimizer steps is below `stop_loss` (None: never)."""
    if stop_loss is None or len(history) < window:
        return False
    return sum(h["loss"] for h in history[-window:]) / window < stop_loss


def train_worker(*, policy_dir, ref_dir, objective, weights, beta, delta_state, delta_mode, delta_ema_decay, lr,
                 weight_decay, warmup_ratio, micro_batch_size, grad_accum, epochs, total_steps,
                 zero_stage, precision, max_grad_norm, max_nonfinite_steps, logps_chunk_size, max_length, seed,
                 checkpoint_every, torch_threads=1, nan_on_micro_batches=(), fail_after_step=None,
                 progress_file=None, rows=None, export_dir=None, engine_reference=False,
                 pref_span="sequence", stop_loss=None, stop_window=20) -> dict | None:
    """One training call on this worker. Ray Train mode (rows=None): data from the "train" dataset shard,
    checkpoints and the final result go through ray.train.report. Session mode (mpo_online.trainer.session): `rows`
    is this worker's shard, no Ray Train checkpoints are written, rank 0 writes the Hugging Face export straight into
    `export_dir`, and the result ({"metrics", "delta", "history"}) is returned. `engine_reference`: take reference
    log-probs from the rows' engine log-probs where valid (engine_ref_logps), the trainer's pass for the rest.
    `pref_span`: what a pair's rewards sum over (batching.PREF_SPANS), for policy and reference alike.
    `stop_loss`: end the call early once the mean loss of the last `stop_window` optimizer steps is below it (the
    history holds world means, so every worker stops at the same step; None: run every planned step)."""
    t_start = time.time()
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from mpo_online.trainer import checkpointing as ck
    from mpo_online.trainer.batching import PairCollator, row_key
    from mpo_online.trainer.losses import RewardBaseline, batch_reward_mean, mpo_loss
    from mpo_online.trainer.progress import report_train_progress

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(seed)
    torch.set_num_threads(torch_threads)
    device = ray.train.torch.get_device()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    pairs = objective not in ("sft", "rft")
    stat_keys = STAT_KEYS if pairs else ("loss", "loss_gen")
    w_pref, w_quality, w_gen = weights
    progress_file = progress_file if rank == 0 else None  # rank 0 tells the driver's console how far it is

    # 1. resume point
    state = {"step": 0, "micro": 0, "nonfinite": 0, "history": [], "data_hashes": None, "done": False,
             "delta": None, "resumed_from_step": None}
    resume_dir = None
    ckpt = ray.train.get_checkpoint() if rows is None else None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = ck.read_state(d)
            if state.get("done"):  # the call had finished: report the same result again
                ray.train.report(state["metrics"], checkpoint=Checkpoint.from_directory(ck.copy_for_report(d))
                                 if rank == 0 else None)
                return
            resume_dir = d
            state["resumed_from_step"] = state["step"]
    baseline = RewardBaseline(delta_mode, delta_ema_decay)
    init_delta = state["delta"] or delta_state
    if init_delta:
        baseline.load_state_dict({**init_delta, "mode": delta_mode, "decay": delta_ema_decay})
    shard = ray.train.get_dataset_shard("train") if rows is None else rows
    collate = PairCollator.from_pretrained(policy_dir, max_length=max_length, pairs=pairs, pref_span=pref_span)

    # 2. reference log-probs, once per call, before the policy engine exists
    t0 = time.time()
    init_seconds = t0 - t_start   # imports, collator, checkpoint lookup
    ref_table, ref_tokens, ref_rows = ({}, 0, shard)
    report_train_progress(progress_file, stage="ref" if pairs else "setup", step=state["step"], total=total_steps)
    if pairs and engine_reference:
        ref_table, ref_rows = engine_ref_logps(shard, collate, batch_size=micro_batch_size)
    n_engine_ref = len(ref_table)
    if pairs and (not engine_reference or ref_rows):   # the pairs the engine's log-probs do not cover
        table, ref_tokens = compute_ref_logps(ref_dir or policy_dir, ref_rows, collate, batch_size=micro_batch_size,
                                              chunk_size=logps_chunk_size, device=device, dtype=dtype)
        ref_table.update(table)
    ref_seconds = time.time() - t0

    # 3. policy engine
    t0 = time.time()
    engine = _build_engine(policy_dir, lr=lr, weight_decay=weight_decay, micro_batch_size=micro_batch_size,
                           grad_accum=grad_accum, world=world, zero_stage=zero_stage, precision=precision,
                           max_grad_norm=max_grad_norm, chunk_size=logps_chunk_size, total_steps=total_steps,
                           warmup_steps=math.ceil(warmup_ratio * total_steps))
    if resume_dir is not None:
        ck.load_train_state(engine, resume_dir)
    setup_seconds = time.time() - t0

    def all_reduce_sum(values) -> list:
        t = torch.tensor(values, dtype=torch.float64, device=engine.device)   # NCCL needs device tensors
        dist.all_reduce(t)
        return t.tolist()

    def checkpoint_and_report(metrics: dict, final: bool) -> None:
        state["delta"] = baseline.state_dict()
        if export_dir is not None:   # session mode: no Ray Train checkpoint; the export is the result
            ck.export_hf(engine, zero_stage=zero_stage, out_dir=export_dir, rank=rank)
            return
        hashes = [None] * world
        dist.all_gather_object(hashes, data_hash)
        state["data_hashes"] = hashes
        if final:
            d = ck.new_local_dir()
            ck.export_hf(engine, zero_stage=zero_stage, out_dir=os.path.join(d, ck.HF_DIR), rank=rank)
            state.update(done=True, metrics=metrics)
            if rank == 0:
                ck.write_state(d, state)
        else:
            d = ck.save_train_state(engine, state, rank=rank)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if (rank == 0 or not final) else None)
        shutil.rmtree(d, ignore_errors=True)

    # 4. the training stream: micro-batch g = epoch * micro_per_epoch + index, the same order on every attempt
    start_step, start_micro = state["step"], state["micro"]
    data_hash = state["data_hashes"][rank] if state["data_hashes"] else ""   # chain over consumed pair keys
    skipped_hash = ""
    win, win_n, win_tokens, win_t0 = dict.fromkeys(stat_keys, 0.0), 0, 0, time.time()
    train_t0, ckpt_seconds, tokens_total = time.time(), 0.0, 0
    g, stopped = -1, False  # stopped: the loss stop ended the call (see _loss_below)
    for _epoch in range(epochs):
        if state["step"] >= total_steps:
            break
        for rows in _iter_rows(shard, micro_batch_size):
            g += 1
            keys = "|".join(row_key(r) for r in rows)
            if g < start_micro:  # consumed before the restart: skip without computing
                skipped_hash = hashlib.sha256((skipped_hash + keys).encode()).hexdigest()
                continue
            if g == start_micro and start_micro and skipped_hash != data_hash:
                raise RuntimeError("resume: this worker's data order differs from the interrupted run's")
            data_hash = hashlib.sha256((data_hash + keys).encode()).hexdigest()
            state["micro"] = g + 1

            batch = collate(rows).to(engine.device, dtype)
            t = _policy_terms(engine, batch, ref_table, pairs=pairs, poison=rank == 0 and g in nan_on_micro_batches)
            bad = not all(bool(torch.isfinite(v).all()) for v in t.values())
            m = float(batch_reward_mean(t["pc"], t["pr"], t["ref_c"], t["ref_r"], beta=beta)) if pairs and not bad \
                else 0.0
            m_sum, n_bad = all_reduce_sum([m, float(bad)])   # the one collective per micro-batch
            if n_bad > 0:   # every worker drops this micro-batch: no backward, no step
                state["nonfinite"] += 1
                if state["nonfinite"] > max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{state['nonfinite']} micro-batches had non-finite log-probs (max_nonfinite_steps="
                        f"{max_nonfinite_steps}); last at micro-batch {g}, step {state['step']}. Aborting.")
                continue
            if pairs:
                baseline.update(m_sum / world)   # before the loss, as the reference code does
                loss, stats = mpo_loss(t["pc"], t["pr"], t["ref_c"], t["ref_r"], t["chosen_nll"], beta=beta,
                                       w_pref=w_pref, w_quality=w_quality, w_gen=w_gen, delta=baseline.value)
            else:
                loss = t["chosen_nll"].mean()
                stats = {"loss": loss.detach(), "loss_gen": loss.detach()}
            boundary = engine.is_gradient_accumulation_boundary()
            lr_now = engine.get_lr()[0]
            engine.backward(loss)
            gnorm = _grad_norm(engine, zero_stage) if (boundary and zero_stage == 0) else None
            engine.step()
            for k in stat_keys:
                win[k] += float(stats[k])
            win_n, win_tokens = win_n + 1, win_tokens + batch.num_tokens
            if not boundary:
                continue

            # an optimizer step was taken: one record of world means
            state["step"] += 1
            gnorm = _grad_norm(engine, zero_stage) if gnorm is None else gnorm
            red = all_reduce_sum([win[k] for k in stat_keys] + [win_n, win_tokens])
            rec = {k: red[i] / red[-2] for i, k in enumerate(stat_keys)}
            rec.update(step=state["step"], lr=lr_now, grad_norm=gnorm, delta=baseline.value, tokens=int(red[-1]),
                       seconds=time.time() - win_t0)
            state["history"].append(rec)
            tokens_total += int(red[-1])
            report_train_progress(progress_file, stage="train", step=state["step"], total=total_steps)
            win, win_n, win_tokens, win_t0 = dict.fromkeys(stat_keys, 0.0), 0, 0, time.time()
            if not math.isfinite(gnorm):
                raise ck.NonFiniteWeightsError(f"non-finite gradient norm at step {state['step']}; aborting "
                                               "(the last checkpoint is intact)")
            if checkpoint_every and state["step"] % checkpoint_every == 0 and state["step"] < total_steps:
                t0 = time.time()
                checkpoint_and_report({"step": state["step"], "delta": baseline.value}, final=False)
                ckpt_seconds += time.time() - t0
                win_t0 = time.time()
            if fail_after_step is not None and start_step < fail_after_step == state["step"] and rank == world - 1:
                # test hook: the last worker process dies (SIGKILL, no Python exception, no answer) after this step
                # (and its checkpoint, if one is due), with its peers about to enter the next step's collectives
                import signal
                os.kill(os.getpid(), signal.SIGKILL)
            stopped = _loss_below(state["history"], stop_loss, stop_window)
            if state["step"] >= total_steps or stopped:
                break
        if stopped:
            break
    train_seconds = time.time() - train_t0 - ckpt_seconds

    # 5. final metrics (means over all steps of the run, also those before a restart) + export
    hist = state["history"]
    metrics = {k: sum(h[k] for h in hist) / len(hist) if hist else float("nan") for k in stat_keys + ("grad_norm",)}
    per_s = tokens_total / train_seconds if train_seconds > 0 else 0.0
    metrics.update(
        steps=state["step"], total_steps=total_steps, micro_batches=state["micro"],
        skipped_nonfinite=state["nonfinite"], delta=baseline.value, delta_count=baseline.count,
        lr_last=hist[-1]["lr"] if hist else lr, resumed_from_step=state["resumed_from_step"],
        tokens=tokens_total, tokens_per_s=per_s, tokens_per_s_per_worker=per_s / world,
        train_seconds=train_seconds, checkpoint_seconds=ckpt_seconds, ref_seconds=ref_seconds,
        ref_tokens_per_s_per_worker=ref_tokens / ref_seconds if ref_tokens else 0.0, init_seconds=init_seconds,
        setup_seconds=setup_seconds, worker_start_time=t_start, worker_done_time=time.time(), world_size=world,
        zero_stage=zero_stage, torch_threads=torch.get_num_threads(), worker_pid=os.getpid(),
        ref_engine_pairs=n_engine_ref, stopped_early=state["step"] < total_steps,
        ref_trainer_pairs=len(ref_table) - n_engine_ref,
    )
    checkpoint_and_report(metrics, final=True)
    if export_dir is not None:
        return {"metrics": metrics, "delta": state["delta"], "history": state["history"]}
    return None

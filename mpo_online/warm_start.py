"""Warm start: make sure the base policy and the prompt data exist, then SFT the policy on the demonstrations.

A random policy cannot produce a single "Final answer:" line, so before any preference learning it learns the task
format from the tasks' chain-of-thought `solution`s (and direct answers for a share of prompts, so direct-answer
evaluation means something). The SFT runs on the run's training worker group (a TrainerSession: Ray Train +
DeepSpeed, `objective="sft"`), the one the rounds' MPO updates then use.

Used by `mpo-online sft --config FILE` and by the recipe's setup (jobs/online_mpo.py); the result is policy v0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mpo_online.data.records import PreferencePair, strip_placeholders


def ensure_model(path: str, *, init_if_missing: bool, text_only: bool = False, seed: int = 0,
                 source: str | None = None) -> Path:
    p = Path(path)
    if source is not None and (init_if_missing or (p / "config.json").exists()):
        from mpo_online.model_import import ensure_imported
        return ensure_imported(p, source)
    if (p / "config.json").exists():
        return p
    if not init_if_missing:
        raise FileNotFoundError(f"model.path {p} is not a model directory (set model.init_if_missing to build the "
                                "embedded tiny policy there, or model.source to import a pretrained one)")
    from mpo_online.synthetic.tiny_model import build_model_dir
    return build_model_dir(p, text_only=text_only, seed=seed)


def ensure_tasks(path: str, *, generate_if_missing: bool, n_train: int, n_heldout: int, seed: int,
                 levels: list[int], max_count: int, open_fraction: float, task: str = "grid") -> Path:
    p = Path(path)
    if task == "word_problems":
        from mpo_online.synthetic.word_problems import FORMAT, write_problem_splits
        want = {"family": "word_problems", "format": FORMAT, "n_train": n_train, "n_heldout": n_heldout,
                "seed": seed, "levels": list(levels)}
        if (p / "train.parquet").exists() and (p / "heldout.parquet").exists():
            _check_task_params(p, **want)
            return p
        if not generate_if_missing:
            raise FileNotFoundError(f"data.dir {p} has no train.parquet / heldout.parquet")
        write_problem_splits(p, n_train, n_heldout, seed, tuple(levels))
        return p
    if (p / "train.parquet").exists() and (p / "heldout.parquet").exists():
        _check_task_params(p, n_train=n_train, n_heldout=n_heldout, seed=seed, levels=list(levels),
                           max_count=max_count, open_fraction=open_fraction)
        return p
    if not generate_if_missing:
        raise FileNotFoundError(f"data.dir {p} has no train.parquet / heldout.parquet")
    from mpo_online.synthetic.tasks import write_task_splits
    write_task_splits(p, n_train=n_train, n_heldout=n_heldout, seed=seed, levels=tuple(levels),
                      max_count=max_count, open_fraction=open_fraction)
    return p


def _check_task_params(p: Path, **want) -> None:
    """Synthetic task dirs record their parameters (tasks.json): refuse one written with different ones, rather than
    silently train and evaluate on data the config does not describe. Dirs without tasks.json are user data."""
    info = p / "tasks.json"
    if not info.exists():
        return
    from mpo_online.synthetic.tasks import FORMAT
    have = json.loads(info.read_text()).get("params", {})
    want = {"format": FORMAT, **want} if "family" not in want else want
    diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    if diff:
        raise ValueError(f"{p} holds synthetic tasks generated with other parameters (have, config): {diff}; point "
                         "data.dir at a new directory or delete this one to regenerate it")


def sft_examples(rows: list[dict], *, cot_instruction: str, direct_instruction: str, direct_fraction: float,
                 seed: int, glance_fraction: float = 0.0, text_only: bool = False) -> list[PreferencePair]:
    """One SFT example per prompt with a demonstration; a seeded share of the `qa` ones in direct-answer form.

    glance_fraction: share of the CoT demonstrations that use the row's glance-style chain (meta["glance"], synthetic
        tasks) instead of its worked solution. text_only: drop the images (and their placeholders): text drills of the
        chain format, which teach the text side (tallies, copying, arithmetic) without any perception."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        if not r.get("solution"):
            continue
        direct = r.get("answer") is not None and rng.random() < direct_fraction
        glance = json.loads(r.get("meta") or "{}").get("glance") if rng.random() < glance_fraction else None
        question = r["question"] + (direct_instruction if direct else cot_instruction if r.get("answer") else "")
        chosen = f"Final answer: {r['answer']}" if direct else glance or r["solution"]
        images = [] if text_only else list(r["images"])
        if text_only:
            question = strip_placeholders(question)
        out.append(PreferencePair(pair_id=PreferencePair.make_id(r["id"], "sft", chosen, None), prompt_id=r["id"],
                                  kind="sft", question=question, images=images, chosen=chosen,
                                  rejected=None, gold_answer=r.get("answer")))
    return out


def warm_start_data(rows: list[dict], *, examples: int | None, text_drills: int, cot_instruction: str,
                    direct_instruction: str, direct_fraction: float, glance_fraction: float,
                    seed: int) -> list[PreferencePair]:
    """The warm start's SFT set: the first `examples` training rows with their images (None: all), then text-only
    drills (worked chains) from the next `text_drills` rows (other grids than the image examples), shuffled by the
    trainer."""
    n = len(rows) if examples is None else min(examples, len(rows))
    kw = dict(cot_instruction=cot_instruction, direct_instruction=direct_instruction, direct_fraction=direct_fraction)
    # drills are always worked chains: a glance chain without its image teaches nothing but guessing
    return (sft_examples(rows[:n], seed=seed, glance_fraction=glance_fraction, **kw)
            + sft_examples(rows[n:n + text_drills], seed=seed + 1, text_only=True, **kw))


def stage2_data(rows: list[dict], *, examples: int | None, count: int, cot_instruction: str, direct_instruction: str,
                direct_fraction: float, glance_fraction: float, seed: int,
                text_drills: int = 0) -> list[PreferencePair]:
    """The second stage's SFT set: `count` demonstrations with their images from the training rows after stage 1's
    image examples (the rows stage 1 saw only as text drills: new images, known chains' format), plus `text_drills`
    worked chains without their images from the first training rows (stage 1 saw those with their images)."""
    n = len(rows) if examples is None else min(examples, len(rows))
    if n + count > len(rows):
        raise ValueError(f"warm_start.stage2_examples={count} needs {n + count} training prompts after "
                         f"warm_start.examples={n}; data.n_train has {len(rows)}")
    if text_drills > n:
        raise ValueError(f"warm_start.stage2_text_drills={text_drills} draws from stage 1's {n} image examples")
    kw = dict(cot_instruction=cot_instruction, direct_instruction=direct_instruction, direct_fraction=direct_fraction)
    return (sft_examples(rows[n:n + count], seed=seed + 2, glance_fraction=glance_fraction, **kw)
            + sft_examples(rows[:text_drills], seed=seed + 3, text_only=True, **kw))


def warm_start_from_config(cfg, *, force: bool = False, evaluate_offline: bool = True, session=None) -> dict:
    """Build/find model and data, SFT into `<run_dir>/policies/v0000`, and (optionally) evaluate it with vLLM.

    session: the run's TrainerSession (the recipe's, which the rounds then reuse); None: one is started for the
    warm start and closed after it."""
    from mpo_online.data.prompts import load_prompts
    from mpo_online.run.state import RunDir

    run = RunDir.open(cfg.loop.run_dir, cfg, force=force)
    base = ensure_model(cfg.model.path, init_if_missing=cfg.model.init_if_missing, text_only=cfg.model.text_only,
                        seed=cfg.model.seed, source=cfg.model.source)
    from mpo_online.model_import import check_checkpoint
    check_checkpoint(base)  # a clear error now, not a stack trace from inside vLLM once the engines start
    data = ensure_tasks(cfg.data.dir, generate_if_missing=cfg.data.generate_if_missing, n_train=cfg.data.n_train,
                        n_heldout=cfg.data.n_heldout, seed=cfg.data.seed, levels=cfg.data.levels,
                        max_count=cfg.data.max_count, open_fraction=cfg.data.open_fraction, task=cfg.data.task)
    out = run.policy_dir(0)
    result = {"policy_dir": str(out), "base_model": str(base), "data": str(data)}
    if not run.has_policy(0):
        if not cfg.warm_start.enabled:
            import shutil
            shutil.copytree(base, out)
            result["note"] = f"policy v0 = {base} as it is (warm_start.enabled: false)"
        else:
            result["train"] = _train_warm_start(cfg, run, base=base, data=data, out=out, session=session)
            (run.root / "warm_start.json").write_text(json.dumps(result, indent=1, default=str))
    if evaluate_offline:
        from mpo_online.evaluate import evaluate, offline_generator
        heldout = load_prompts(data / "heldout.parquet", images_anywhere=cfg.data.images_anywhere)[0]
        gen = offline_generator(str(out), max_model_len=cfg.serving.max_model_len, kv_cache_gb=cfg.serving.kv_cache_gb)
        result["eval"] = evaluate(gen, heldout, cot_instruction=cfg.data.cot_instruction,
                                  direct_instruction=cfg.data.direct_instruction, max_tokens=cfg.rollout.max_tokens)
    return result


def _train_warm_start(cfg, run, *, base: Path, data: Path, out: Path, session) -> dict:
    """Stage 1 (format, text drills, first image demonstrations) into `out`, or, with a second stage, into
    <run_dir>/warm_start_stage1 and stage 2 from there into `out`. Each stage's result is cached in its output
    directory, so a run interrupted in stage 2 resumes there. Returns the last stage's metrics."""
    import ray

    from mpo_online.data.prompts import load_prompts
    from mpo_online.data.records import pairs_to_table, write_parquet_atomic
    from mpo_online.trainer.progress import TRAIN_PROGRESS_FILE
    from mpo_online.trainer.session import TrainerSession, session_kwargs

    ws, t, res = cfg.warm_start, cfg.trainer, cfg.resources
    rows = load_prompts(data / "train.parquet", images_anywhere=cfg.data.images_anywhere)[0]
    kw = dict(examples=ws.examples, cot_instruction=cfg.data.cot_instruction,
              direct_instruction=cfg.data.direct_instruction, direct_fraction=ws.direct_fraction,
              glance_fraction=ws.glance_fraction, seed=cfg.data.seed)
    stage1_out = run.root / "warm_start_stage1" if ws.stage2_examples else out
    stop = dict(stop_loss=ws.stop_loss, stop_window=ws.stop_window)
    stages = [("warm_start", warm_start_data(rows, text_drills=ws.text_drills, **kw), base, stage1_out, ws.lr, stop)]
    if ws.stage2_examples:
        stages.append(("warm_start_stage2", stage2_data(rows, count=ws.stage2_examples,
                                                           text_drills=ws.stage2_text_drills, **kw), stage1_out, out,
                       ws.stage2_lr, {}))
    if not ray.is_initialized():
        ray.init(num_cpus=res.num_cpus, num_gpus=res.num_gpus, include_dashboard=False)
    own = session is None
    if own:
        session = TrainerSession.start(storage_dir=str(run.root / "warm_start_train"), **session_kwargs(res))
    try:
        for name, examples, src, dst, lr, stop in stages:
            sft_path = run.root / f"{name}_sft.parquet"
            write_parquet_atomic(pairs_to_table(examples), sft_path)
            trained = session.train(
                str(sft_path), policy_dir=str(src), out_dir=str(dst), objective="sft", weights=(0.0, 0.0, 1.0),
                run_name=name, group_by=ws.group_by or t.group_by,
                progress_file=str(run.root / "warm_start_train" / "warm_start" / TRAIN_PROGRESS_FILE),
                lr=lr, weight_decay=0.0, warmup_ratio=t.warmup_ratio, epochs=ws.epochs,
                micro_batch_size=ws.micro_batch_size, global_batch_size=ws.global_batch_size,
                zero_stage=t.zero_stage, precision=t.precision, max_grad_norm=t.max_grad_norm,
                max_nonfinite_steps=t.max_nonfinite_steps, logps_chunk_size=t.logps_chunk_size,
                max_length=t.max_length, seed=t.seed, **stop)
    finally:
        if own:
            session.close()
    return trained.metrics


def sft_in_process(model_dir, rows: list[dict], *, steps: int, lr: float = 3e-3, batch_size: int = 16,
                   seed: int = 0, threads: int | None = None) -> dict:
    """Plain-PyTorch SFT of `model_dir` in place, in this process (no Ray, no DeepSpeed): `steps` AdamW steps on
    pair-schema SFT rows (e.g. `pairs_to_table(sft_examples(...)).to_pylist()`), the trainer's batches and token-mean
    NLL. For tests and benchmarks that need, in seconds, a policy whose samples have the task's format (the recipe's
    warm start is `warm_start_from_config`). Returns {"loss": last loss, "seconds"}."""
    import random as _random
    import time

    import torch

    from mpo_online.trainer.batching import PairCollator
    from mpo_online.trainer.logps import load_model, sequence_logps

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    collate = PairCollator.from_pretrained(model_dir, pairs=False, max_length=512)
    model = load_model(model_dir)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order, rng, t0, loss = [], _random.Random(seed), time.time(), None
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(rows)), len(rows))
        batch = collate([rows[i] for i in order[:batch_size]]).tensors
        del order[:batch_size]
        sum_logps, _, n_tokens = sequence_logps(model, batch)
        loss = -(sum_logps.sum() / n_tokens.sum())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    model.save_pretrained(model_dir)
    return {"loss": None if loss is None else loss.item(), "seconds": time.time() - t0}

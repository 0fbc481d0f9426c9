"""One rollout round as a streaming Ray Data pipeline: prompts -> sampled responses -> verdicts -> MPO pairs.

    stats = run_round(prompts_ds, client=PolicyClient("mpo-policy"), round=3, policy_version=3, out_dir=run_dir,
                      policy_dir="runs/x/policies/v0003", ...)

Called by the training loop once per round (no command of its own). Stages, all streaming (a batch of prompts
moves on as soon as its generations return, so pair building and Dropout-NTP requests overlap later rollouts):

  select   (tasks)  keep this round's prompt ids (mpo_online.pairs.sample_round_prompts); bad rows (corrupt
                    image, empty question, ...: mpo_online.data.prompts.check_row) are marked rejected, not dropped
  rollout  (tasks)  one request per prompt with n = samples_per_prompt, through the PolicyClient (Serve handles);
                    `concurrency` tasks keep several batches in flight so the engines stay busy. Every sample comes
                    back with its token ids and the engine's per-token log-probs (and the prompt's token ids)
  verify   (tasks)  extract each sample's final answer, judge it against the gold answer
  pairs    (tasks)  correctness pairs per prompt (all k samples of a prompt come back from one request, so they
                    are in one row: no groupby); open prompts pick their Dropout-NTP chosen responses
  ntp      (tasks)  the image-less continuation requests for those (the chosen's first k token ids after the
                    text-only chat prompt; the server renders it, so no worker loads a tokenizer), then the pairs

The driver consumes the stream and writes `round_XXXX/` (mpo_online.rollout.outputs): pairs.parquet
(records.pair_schema, with token ids and engine log-probs), rollouts.parquet (every sample and continuation with its
verdict, token ids, engine log-probs and the prompt token ids the engine used), rejects.jsonl, pairs_stats.json. Rows
travel between stages as Arrow tables in one fixed schema (WORK_SCHEMA) whose nested values are JSON strings: an
all-null column in one block must not get a different type than in the next. The generation stages are capped task
pools, not actor pools: Ray's warm worker processes start a task at once, while a fresh actor pool per round spent
3-10 s starting before the first request; each worker process keeps its Serve handle across tasks (`_cached`).

Seeds: each request's sampling seed is derived from (seed, round, prompt id[, sample]); vLLM gives the i-th of n
samples seed + i. So a rerun of a round with the same seed and weights asks for exactly the same samples.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from mpo_online.data.records import PreferencePair, Rollout, openai_messages, write_text_atomic
from mpo_online.pairs import (
    correctness_pairs,
    derive_seed,
    drop_placeholder_samples,
    label_rollout,
    ntp_chosen,
    ntp_continuation_request,
    ntp_pair,
    sample_round_prompts,
)
from mpo_online.rollout.outputs import RoundStats, collect_round, dead_row, interval_union, json_field
from mpo_online.synthetic.chains import CHOSEN_CHECKS, chosen_checker, row_meta

WORK_SCHEMA = pa.schema([
    ("id", pa.string()), ("kind", pa.string()), ("question", pa.string()),
    ("images", pa.list_(pa.binary())), ("answer", pa.string()),
    ("meta", pa.string()),  # the prompt row's meta (JSON): the chosen-side check reads a synthetic task's grid there
    ("rejects", pa.string()),  # JSON list of {"stage", "reason", "detail"}; a select/rollout reject ends the row
    ("result", pa.string()),  # JSON: the rollout request's result
    ("rollouts", pa.string()),  # JSON list of Rollout dicts, with verdicts
    ("ntp", pa.string()),  # JSON list of {"sample_index", "prefix", "k"}: Dropout-NTP chosen responses (k tokens)
    ("pairs", pa.string()),  # JSON list of pair dicts (images left out: the row carries them once)
    ("continuations", pa.string()),  # JSON list of continuation records
    ("skipped", pa.string()),  # JSON Counter
    ("timings", pa.string()),  # JSON {stage: [[t0, t1], ...]} (time.time() of each batch a stage ran)
])
ENGINE_STAGES = ("rollout", "ntp")
_round = round  # run_round takes a `round` argument (the name the loop uses everywhere)


# ----------------------------------------------------------------------------------------------- small helpers

def _note(row: dict, stage: str, t0: float, t1: float) -> None:
    timings = json_field(row.get("timings"), {})
    timings.setdefault(stage, []).append([t0, t1])
    row["timings"] = json.dumps(timings)


def _reject(row: dict, stage: str, reason: str, detail: str) -> None:
    rejects = json_field(row.get("rejects"), [])
    row["rejects"] = json.dumps(rejects + [{"stage": stage, "reason": reason, "detail": str(detail)[:500]}])


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in WORK_SCHEMA.names} for r in rows], schema=WORK_SCHEMA)


def _row_stage(name: str):
    """fn(rows, **kw) mutating WORK rows in place -> a pyarrow map_batches function that also records its time."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(batch: pa.Table, **kw) -> pa.Table:
            t0, rows = time.time(), batch.to_pylist()
            fn(rows, **kw)
            t1 = time.time()
            for row in rows:
                _note(row, name, t0, t1)
            return _table(rows)
        return run
    return wrap


_CACHE: dict = {}  # per worker process: a Serve handle outlives the task that made it


def _cached(obj, make):
    """make(obj), once per worker process and pickled value of obj (tasks receive fresh unpickled copies; a new
    deployment handle would start a new router)."""
    import ray.cloudpickle

    key = ray.cloudpickle.dumps(obj)
    if key not in _CACHE:
        _CACHE[key] = make(obj)
    return _CACHE[key]


def _resolve_client(client):
    """A PolicyClient-like object (anything with .generate), from itself, an app name, or a zero-arg factory."""
    if hasattr(client, "generate"):
        return client
    if isinstance(client, str):
        from serving.client import PolicyClient
        return PolicyClient(client)
    return client()


def _generate(client, requests: list[dict]) -> tuple[list[dict], float, float]:
    """client.generate(requests) with its wall-clock interval; a failed call fails each of its requests."""
    t0 = time.time()
    try:
        results = _cached(client, _resolve_client).generate(requests) if requests else []
    except Exception as exc:
        results = [{"outputs": [], "error": f"{type(exc).__name__}: {exc}"} for _ in requests]
    return results, t0, time.time()


# ------------------------------------------------------------------------------------------------------ stages

def _select(batch: pa.Table, *, ids: list, cot_instruction: str) -> pa.Table:
    """Keep this round's prompts; validate them; reshape into WORK_SCHEMA rows."""
    import pyarrow.compute as pc

    from mpo_online.data.prompts import check_row
    t0 = time.time()
    rows = batch.filter(pc.is_in(batch["id"], value_set=pa.array(ids, pa.string()))).to_pylist()
    out = []
    for row in rows:
        bad = check_row(row)
        w = {"id": row["id"], "kind": row.get("kind"), "answer": row.get("answer"), "meta": row.get("meta"),
             "question": (row.get("question") or "") + cot_instruction, "images": row.get("images") or []}
        if bad:
            w["images"], w["meta"] = [], None  # possibly not bytes / a string at all; the reject record is what matters
            _reject(w, "select", *bad)
        out.append(w)
    t1 = time.time()
    for w in out:
        _note(w, "select", t0, t1)
    return _table(out)


def rollout_request(row: dict, *, n: int, temperature: float, top_p: float, max_tokens: int, seed: int,
                    round: int) -> dict:
    """A prompt row's rollout request (n samples, their token ids and engine log-probs, the prompt's token ids)."""
    return {"messages": openai_messages(row["question"], row["images"]), "n": n, "temperature": temperature,
            "top_p": top_p, "max_tokens": max_tokens, "seed": derive_seed(seed, "rollout", round, row["id"]),
            "logprobs": True, "return_prompt_token_ids": True}


def _rollouts(batch: pa.Table, *, client, n: int, temperature: float, top_p: float, max_tokens: int, seed: int,
              round: int) -> pa.Table:
    """One request per live prompt (n samples), the batch's requests in one client call."""
    rows = batch.to_pylist()
    live = [r for r in rows if not dead_row(r)]
    requests = [rollout_request(r, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                                round=round) for r in live]
    results, t0, t1 = _generate(client, requests)
    for row, req, res in zip(live, requests, results):
        row["result"] = json.dumps({**res, "seed": req["seed"]})
        _note(row, "rollout", t0, t1)
        if res.get("error") or not res.get("outputs"):
            _reject(row, "rollout", "generation_failed", res.get("error") or "no outputs")
    return _table(rows)


@_row_stage("verify")
def _verify(rows: list[dict], *, round: int, policy_version: int) -> None:
    """Result -> Rollout records with final answers and verdicts (None for prompts without ground truth)."""
    for row in rows:
        if not dead_row(row):
            outputs = json.loads(row["result"])["outputs"]
            rollouts = [label_rollout(Rollout(prompt_id=row["id"], round=round, policy_version=policy_version,
                                              sample_index=i, text=o["text"], n_tokens=int(o["n_tokens"]),
                                              finish_reason=str(o["finish_reason"]), token_ids=o.get("token_ids"),
                                              logprobs=o.get("logprobs"), text_offsets=o.get("text_offsets")),
                                      row["answer"])
                        for i, o in enumerate(outputs)]
            row["rollouts"] = json.dumps([asdict(r) for r in rollouts])


def _pair_dict(p: PreferencePair, chosen_tokens, rejected_tokens) -> dict:
    d = asdict(p)
    del d["images"]
    return {**d, "chosen_tokens": chosen_tokens, "rejected_tokens": rejected_tokens}


@_row_stage("pairs")
def _pairs(rows: list[dict], *, round: int, policy_version: int, seed: int, max_pairs: int, ratio: float,
           dropout_ntp: bool, placeholder_ids: list[int], chosen_check: str = "answer") -> None:
    """Correctness pairs for ground-truth prompts; the Dropout-NTP chosen responses for the others. Samples holding
    an input placeholder token (`placeholder_ids`) take no part: the trainer could not score them. `chosen_check`:
    the chosen-side check of correct responses (config pairs.chosen_check), built from each row's meta."""
    for row in rows:
        if dead_row(row):
            continue
        rollouts, n_bad = drop_placeholder_samples([Rollout(**r) for r in json.loads(row["rollouts"])],
                                                   placeholder_ids)
        cap_seed = derive_seed(seed, "cap", round, row["id"])
        if row["answer"] is not None:
            pairs, skipped = correctness_pairs(row, rollouts, max_pairs=max_pairs, round=round,
                                               policy_version=policy_version, rng_seed=cap_seed,
                                               chosen_ok=chosen_checker(chosen_check, row_meta(row)))
            tokens = {r.text: r.n_tokens for r in rollouts}
            row["pairs"] = json.dumps([_pair_dict(p, tokens[p.chosen], tokens[p.rejected]) for p in pairs])
        elif dropout_ntp:
            picked, skipped = ntp_chosen(rollouts, max_pairs=max_pairs, ratio=ratio, rng_seed=cap_seed)
            row["ntp"] = json.dumps([{"sample_index": r.sample_index, "prefix": prefix, "k": k}
                                     for r, prefix, k in picked])
        else:
            skipped = Counter(no_ground_truth=1)
        if n_bad:
            skipped["placeholder_token_in_response"] += n_bad
        row["skipped"] = json.dumps(skipped)


def _continuations(batch: pa.Table, *, client, policy_version: int, temperature: float, top_p: float,
                   max_tokens: int, seed: int, round: int, placeholder_ids: list[int]) -> pa.Table:
    """Dropout-NTP: the policy continues each chosen response's first k tokens without the image;
    rejected = prefix + continuation (ids: chosen ids[:k] + continuation ids)."""
    rows = batch.to_pylist()
    jobs = []  # (row, chosen rollout, prefix, k, request)
    for row in rows:
        if dead_row(row) or not row.get("ntp"):
            continue
        by_index = {r["sample_index"]: Rollout(**r) for r in json.loads(row["rollouts"])}
        for item in json.loads(row["ntp"]):
            chosen, k = by_index[item["sample_index"]], item["k"]
            req = ntp_continuation_request(
                row["question"], chosen.token_ids[:k], temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                seed=derive_seed(seed, "ntp", round, row["id"], item["sample_index"]))
            jobs.append((row, chosen, item["prefix"], k, req))
    results, t0, t1 = _generate(client, [j[-1] for j in jobs])
    for (row, chosen, prefix, k, req), res in zip(jobs, results):
        _note(row, "ntp", t0, t1)
        pairs, conts = json_field(row.get("pairs"), []), json_field(row.get("continuations"), [])
        skipped = Counter(json_field(row.get("skipped"), {}))
        if res.get("error") or not res.get("outputs"):
            _reject(row, "ntp", "generation_failed", res.get("error") or "no outputs")
            skipped["ntp_generation_failed"] += 1
        else:
            out = res["outputs"][0]
            pair = ntp_pair(row, chosen, prefix, out["text"], round=round, policy_version=policy_version,
                            prefix_tokens=k, continuation_token_ids=out.get("token_ids"))
            if pair is None:
                skipped["ntp_same_as_chosen"] += 1
            elif set(placeholder_ids).intersection(out.get("token_ids") or ()):
                skipped["placeholder_token_in_response"] += 1
            else:
                pairs.append(_pair_dict(pair, chosen.n_tokens, k + int(out["n_tokens"])))
            # the continuation's own engine log-probs (under the image-less prompt): kept for analysis and tests
            conts.append({"sample_index": chosen.sample_index, "text": out["text"],
                          "n_tokens": int(out["n_tokens"]), "finish_reason": str(out["finish_reason"]),
                          "seed": req["seed"], "served_version": res.get("version"), "n_images_sent": 0,
                          "token_ids": out.get("token_ids"), "logprobs": out.get("logprobs"),
                          "prompt_token_ids": res.get("prompt_token_ids")})
        row["pairs"], row["continuations"] = json.dumps(pairs), json.dumps(conts)
        row["skipped"] = json.dumps(skipped)
    return _table(rows)


# ------------------------------------------------------------------------------------------------------ driver

def run_round(prompts_ds, *, client, round: int, policy_version: int, out_dir, samples_per_prompt: int = 8,
              temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 96, prompts_per_round: int = 128,
              max_pairs_per_prompt: int = 15, ntp_prefix_ratio: float = 0.5, dropout_ntp: bool = True,
              cot_instruction: str = "", chosen_check: str = "answer", seed: int = 0, policy_dir: str | None = None,
              prompt_ids: list[str] | None = None, batch_size: int = 16,
              concurrency: int = 2, ntp_concurrency: int = 1, data_cpus: float = 0.25,
              progress=None) -> RoundStats:
    """Run one round (see the module docstring) and write `out_dir/round_XXXX/`; returns its RoundStats.

    `client`: a PolicyClient (or its app name, or a zero-arg factory). `policy_dir`: the served policy's checkpoint
    directory; its config names the input placeholder tokens (`<image>`) a scorable sample must not hold (without it
    no sample is left out, and the trainer refuses a response holding one). `prompt_ids`: all ids of
    `prompts_ds` when already known (saves a pass over the data). `batch_size` prompts per client call,
    `concurrency` rollout calls in flight: batch_size x concurrency x samples_per_prompt sequences (defaults: 256,
    vLLM's default max_num_seqs). `data_cpus`: logical CPUs per Ray Data task (the generation tasks mostly wait).
    `progress(samples_done, samples_total, pairs_done)` is called as finished prompts reach the driver.
    `chosen_check`: which correct responses may be chosen (config pairs.chosen_check, mpo_online.synthetic.chains).
    """
    if chosen_check not in CHOSEN_CHECKS:  # here, not as a failed task deep in the stream
        raise ValueError(f"chosen_check must be one of {CHOSEN_CHECKS}, got {chosen_check!r}")
    import ray

    t_start = time.time()
    from mpo_online.data.records import input_placeholder_ids

    placeholder_ids = sorted(input_placeholder_ids(policy_dir)) if policy_dir is not None else []
    sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, round=round)
    if prompt_ids is None:
        batches = prompts_ds.select_columns(["id"]).iter_batches(batch_format="pyarrow", batch_size=None)
        prompt_ids = [x for b in batches for x in b.column("id").to_pylist() if x is not None]
    chosen = sample_round_prompts(prompt_ids, round, prompts_per_round, seed)
    t_sampled = time.time()

    ds = prompts_ds.map_batches(_select, batch_format="pyarrow", num_cpus=data_cpus, fn_kwargs={
        "ids": chosen, "cot_instruction": cot_instruction})
    # Small blocks: a task gets whole blocks, so one big block would put the whole round in one request batch.
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    ds = ds.map_batches(_rollouts, batch_format="pyarrow", batch_size=batch_size, num_cpus=data_cpus,
                        compute=ray.data.TaskPoolStrategy(size=concurrency),
                        fn_kwargs={"client": client, "n": samples_per_prompt, **sampling})
    ds = ds.map_batches(_verify, batch_format="pyarrow", num_cpus=data_cpus,
                        fn_kwargs={"round": round, "policy_version": policy_version})
    ds = ds.map_batches(_pairs, batch_format="pyarrow", num_cpus=data_cpus, fn_kwargs={
        "round": round, "policy_version": policy_version, "seed": seed, "max_pairs": max_pairs_per_prompt,
        "ratio": ntp_prefix_ratio, "dropout_ntp": dropout_ntp, "placeholder_ids": placeholder_ids,
        "chosen_check": chosen_check})
    if dropout_ntp:
        ds = ds.map_batches(_continuations, batch_format="pyarrow", batch_size=batch_size, num_cpus=data_cpus,
                            compute=ray.data.TaskPoolStrategy(size=ntp_concurrency),
                            fn_kwargs={"client": client, "policy_version": policy_version,
                                       "placeholder_ids": placeholder_ids, **sampling})
    rows: dict[str, dict] = {}
    duplicates = []
    n_samples = n_pairs = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            if row["id"] in rows:
                duplicates.append(row["id"])
            else:
                rows[row["id"]] = row
                n_samples += len(json_field(row.get("rollouts"), []))
                n_pairs += len(json_field(row.get("pairs"), []))
        if progress is not None:
            progress(n_samples, len(chosen) * samples_per_prompt, n_pairs)
    t_pipeline = time.time()
    stats = collect_round(rows, duplicates, chosen, Path(out_dir) / f"round_{round:04d}", round, policy_version)
    t_end = time.time()

    spans: dict[str, set] = {}
    for row in rows.values():
        for stage, ss in json_field(row.get("timings"), {}).items():
            spans.setdefault(stage, set()).update(tuple(s) for s in ss)
    engine = [s for st in ENGINE_STAGES for s in spans.get(st, ())]
    busy, wall = interval_union(engine), t_end - t_start
    stats.engine_busy_fraction = _round(busy / wall, 4) if wall > 0 else 0.0
    stats.seconds = {k: _round(v, 3) for k, v in {
        "total": wall, "sample_prompts": t_sampled - t_start, "pipeline": t_pipeline - t_sampled,
        "write": t_end - t_pipeline, "engine_busy": busy,
        # the idle start (planning, first batch) and tail (last pairs, files) of the round
        "before_first_request": min((a for a, _ in engine), default=t_end) - t_start,
        "after_last_request": t_end - max((b for _, b in engine), default=t_start)}.items()}
    # per stage: wall time with at least one of its batches running; [first start, last end] from the round start
    stats.seconds["stage_active"] = {st: _round(interval_union(v), 3) for st, v in sorted(spans.items())}
    stats.seconds["stage_window"] = {st: [_round(min(a for a, _ in v) - t_start, 3),
                                          _round(max(b for _, b in v) - t_start, 3)] for st, v in sorted(spans.items())}
    stats.files["pairs_stats.json"] = write_text_atomic(Path(out_dir) / f"round_{round:04d}" / "pairs_stats.json",
                                                         json.dumps(stats.to_dict(), indent=1) + "\n")
    if rows and not stats.samples:
        raise RuntimeError(f"round {round}: no prompt got a generation; see {out_dir}/round_{round:04d}/rejects.jsonl")
    return stats

"""One rollout round as a streaming Ray Data pipeline: prompts -> sampled responses -> verdicts -> MPO pairs.

    stats = run_round(prompts_ds, client=PolicyClient("mpo-policy"), round=3, policy_version=3, out_dir=run_dir,
                      policy_dir="artifacts/tiny_vlm", ...)

Called by the training loop once per round (no command of its own). Stages, all streaming (a batch of prompts
moves on as soon as its generations return, so pair building and Dropout-NTP requests overlap later rollouts):

  select   (tasks)  keep this round's prompt ids (mpo_online.pairs.sample_round_prompts); bad rows (corrupt
                    image, empty question, ...: mpo_online.data.check_row) are marked rejected, not dropped
  rollout  (tasks)  one request per prompt with n = samples_per_prompt, through the PolicyClient (Serve handles);
                    `concurrency` tasks keep several batches in flight so the engines stay busy
  verify   (tasks)  extract each sample's final answer, judge it against the gold answer
  pairs    (tasks)  correctness pairs per prompt (all k samples of a prompt come back from one request, so they
                    are in one row: no groupby); open prompts pick their Dropout-NTP chosen responses
  ntp      (tasks)  the image-less continuation requests for those, then the Dropout-NTP pairs

The driver consumes the stream and writes `round_XXXX/`: pairs.parquet (records.pair_schema), rollouts.parquet
(every sample and continuation with its verdict and what was sent), rejects.jsonl, pairs_stats.json. Rows travel
between stages as Arrow tables in one fixed schema (WORK_SCHEMA) whose nested values are JSON strings: an all-null
column in one block must not get a different type than in the next. The generation stages are capped task pools,
not actor pools: Ray's warm worker processes start a task at once, while a fresh actor pool per round spent 3-10 s
starting before the first request; each worker process keeps its Serve handle across tasks (`_cached`).

Seeds: each request's sampling seed is derived from (seed, round, prompt id[, sample]); vLLM gives the i-th of n
samples seed + i. So a rerun of a round with the same seed and weights asks for exactly the same samples.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from mpo_online.pairs import (correctness_pairs, derive_seed, label_rollout, ntp_chosen, ntp_continuation_request,
                              ntp_pair, PromptRenderer, sample_round_prompts, split_template,
                              text_only_messages)
from mpo_online.records import (PreferencePair, Rollout, openai_messages, pairs_to_table, write_parquet_atomic,
                                 write_text_atomic)

WORK_SCHEMA = pa.schema([
    ("id", pa.string()), ("kind", pa.string()), ("question", pa.string()),
    ("images", pa.list_(pa.binary())), ("answer", pa.string()),
    ("rejects", pa.string()),  # JSON list of {"stage", "reason", "detail"}; a select/rollout reject ends the row
    ("result", pa.string()),  # JSON: the rollout request's result
    ("rollouts", pa.string()),  # JSON list of Rollout dicts, with verdicts
    ("ntp", pa.string()),  # JSON list of {"sample_index", "prefix"}: Dropout-NTP chosen responses
    ("pairs", pa.string()),  # JSON list of pair dicts (images left out: the row carries them once)
    ("continuations", pa.string()),  # JSON list of continuation records
    ("skipped", pa.string()),  # JSON Counter
    ("timings", pa.string()),  # JSON {stage: [[t0, t1], ...]} (time.time() of each batch a stage ran)
])
ROLLOUT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("kind", pa.string()), ("source", pa.string()), ("round", pa.int32()),
    ("policy_version", pa.int32()), ("served_version", pa.int32()), ("sample_index", pa.int32()),
    ("text", pa.string()), ("n_tokens", pa.int32()), ("finish_reason", pa.string()), ("final_answer", pa.string()),
    ("correct", pa.bool_()), ("seed", pa.int64()), ("n_images_sent", pa.int32()), ("prompt_sent", pa.string()),
])
ENGINE_STAGES = ("rollout", "ntp")
_round = round  # run_round/_collect take a `round` argument (the name the loop uses everywhere)


@dataclass
class RoundStats:
    round: int
    policy_version: int
    prompts: int = 0  # sampled for the round (rejected ones included)
    qa_prompts: int = 0
    open_prompts: int = 0
    samples: int = 0  # sampled responses (continuations not included)
    sample_accuracy: float | None = None  # mean over ground-truth samples
    pass_at_k: float | None = None  # share of ground-truth prompts with at least one correct sample
    format_failure_rate: float | None = None  # ground-truth samples without a parseable final answer
    pairs: dict = field(default_factory=dict)  # kind -> count
    skipped: dict = field(default_factory=dict)  # reason -> count (units: see mpo_online.pairs)
    mean_chars: dict = field(default_factory=dict)  # {"chosen", "rejected"} over all pairs
    mean_tokens: dict = field(default_factory=dict)
    tokens_generated: int = 0
    seconds: dict = field(default_factory=dict)
    engine_busy_fraction: float = 0.0  # union of in-flight generation intervals / round wall time
    rejects: int = 0
    rejects_by_reason: dict = field(default_factory=dict)
    served_versions: list = field(default_factory=list)
    files: dict = field(default_factory=dict)  # relative path -> sha256

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- small helpers

def interval_union(intervals) -> float:
    """Total length covered by a set of [start, end] intervals (overlaps counted once)."""
    total, cur_start, cur_end = 0.0, None, None
    for s, e in sorted((float(a), float(b)) for a, b in intervals):
        if cur_end is None or s > cur_end:
            total += 0.0 if cur_end is None else cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    return total + (0.0 if cur_end is None else cur_end - cur_start)


def _loads(value, default):
    return json.loads(value) if value else default


def _note(row: dict, stage: str, t0: float, t1: float) -> None:
    timings = _loads(row.get("timings"), {})
    timings.setdefault(stage, []).append([t0, t1])
    row["timings"] = json.dumps(timings)


def _reject(row: dict, stage: str, reason: str, detail: str) -> None:
    row["rejects"] = json.dumps(_loads(row.get("rejects"), []) + [{"stage": stage, "reason": reason,
                                                                   "detail": str(detail)[:500]}])


def _dead(row: dict) -> bool:
    return any(r["stage"] in ("select", "rollout") for r in _loads(row.get("rejects"), []))


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


_CACHE: dict = {}  # per worker process: a Serve handle or tokenizer outlives the task that made it


def _cached(obj, make):
    """make(obj), once per worker process and pickled value of obj (tasks receive fresh unpickled copies; a new
    deployment handle would start a new router and a PromptRenderer would reload its tokenizer)."""
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
        from mpo_online.serve_client import PolicyClient
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

    from mpo_online.data import check_row
    t0 = time.time()
    rows = batch.filter(pc.is_in(batch["id"], value_set=pa.array(ids, pa.string()))).to_pylist()
    out = []
    for row in rows:
        bad = check_row(row)
        w = {"id": row["id"], "kind": row.get("kind"), "answer": row.get("answer"),
             "question": (row.get("question") or "") + cot_instruction, "images": row.get("images") or []}
        if bad:
            w["images"] = []  # possibly not bytes at all; the reject record is what matters
            _reject(w, "select", *bad)
        out.append(w)
    t1 = time.time()
    for w in out:
        _note(w, "select", t0, t1)
    return _table(out)


def _rollouts(batch: pa.Table, *, client, n: int, temperature: float, top_p: float, max_tokens: int, seed: int,
              round: int) -> pa.Table:
    """One request per live prompt (n samples), the batch's requests in one client call."""
    rows = batch.to_pylist()
    live = [r for r in rows if not _dead(r)]
    requests = [{"messages": openai_messages(r["question"], r["images"]), "n": n, "temperature": temperature,
                 "top_p": top_p, "max_tokens": max_tokens, "seed": derive_seed(seed, "rollout", round, r["id"])}
                for r in live]
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
        if not _dead(row):
            outputs = json.loads(row["result"])["outputs"]
            rollouts = [label_rollout(Rollout(prompt_id=row["id"], round=round, policy_version=policy_version,
                                              sample_index=i, text=o["text"], n_tokens=int(o["n_tokens"]),
                                              finish_reason=str(o["finish_reason"])), row["answer"])
                        for i, o in enumerate(outputs)]
            row["rollouts"] = json.dumps([asdict(r) for r in rollouts])


def _pair_dict(p: PreferencePair, chosen_tokens, rejected_tokens) -> dict:
    d = asdict(p)
    del d["images"]
    return {**d, "chosen_tokens": chosen_tokens, "rejected_tokens": rejected_tokens}


@_row_stage("pairs")
def _pairs(rows: list[dict], *, round: int, policy_version: int, seed: int, max_pairs: int, ratio: float,
           dropout_ntp: bool) -> None:
    """Correctness pairs for ground-truth prompts; the Dropout-NTP chosen responses for the others."""
    for row in rows:
        if _dead(row):
            continue
        rollouts = [Rollout(**r) for r in json.loads(row["rollouts"])]
        cap_seed = derive_seed(seed, "cap", round, row["id"])
        if row["answer"] is not None:
            pairs, skipped = correctness_pairs(row, rollouts, max_pairs=max_pairs, round=round,
                                               policy_version=policy_version, rng_seed=cap_seed)
            tokens = {r.text: r.n_tokens for r in rollouts}
            row["pairs"] = json.dumps([_pair_dict(p, tokens[p.chosen], tokens[p.rejected]) for p in pairs])
        elif dropout_ntp:
            picked, skipped = ntp_chosen(rollouts, max_pairs=max_pairs, ratio=ratio, rng_seed=cap_seed)
            row["ntp"] = json.dumps([{"sample_index": r.sample_index, "prefix": prefix} for r, prefix in picked])
        else:
            skipped = Counter(no_ground_truth=1)
        row["skipped"] = json.dumps(skipped)


def _continuations(batch: pa.Table, *, client, template: tuple[str, str] | None, renderer: PromptRenderer | None,
                   policy_version: int, temperature: float, top_p: float, max_tokens: int, seed: int,
                   round: int) -> pa.Table:
    """Dropout-NTP: the policy continues each chosen prefix without the image; rejected = prefix + continuation.

    `template`: the driver's pre-split chat template (no tokenizer in the workers: loading transformers there
    delayed the first continuations by seconds); `renderer` only when the template cannot be split."""
    rows = batch.to_pylist()
    jobs = []  # (row, chosen rollout, prefix, request)
    for row in rows:
        if _dead(row) or not row.get("ntp"):
            continue
        templated = (template[0] + row["question"] + template[1] if template is not None
                     else _cached(renderer, lambda r: r)(text_only_messages(row["question"])))
        by_index = {r["sample_index"]: r for r in json.loads(row["rollouts"])}
        for item in json.loads(row["ntp"]):
            req = ntp_continuation_request(
                row["question"], item["prefix"], templated_prompt=templated, temperature=temperature,
                top_p=top_p, max_tokens=max_tokens,
                seed=derive_seed(seed, "ntp", round, row["id"], item["sample_index"]))
            jobs.append((row, by_index[item["sample_index"]], item["prefix"], req))
    results, t0, t1 = _generate(client, [j[3] for j in jobs])
    for (row, chosen, prefix, req), res in zip(jobs, results):
        _note(row, "ntp", t0, t1)
        pairs, conts = _loads(row.get("pairs"), []), _loads(row.get("continuations"), [])
        skipped = Counter(_loads(row.get("skipped"), {}))
        if res.get("error") or not res.get("outputs"):
            _reject(row, "ntp", "generation_failed", res.get("error") or "no outputs")
            skipped["ntp_generation_failed"] += 1
        else:
            out = res["outputs"][0]
            pair = ntp_pair(row, chosen["text"], prefix, out["text"], round=round, policy_version=policy_version)
            if pair is None:
                skipped["ntp_same_as_chosen"] += 1
            else:
                # rejected tokens: the continuation's here; the driver adds the prefix's (it has the tokenizer)
                pairs.append(_pair_dict(pair, chosen["n_tokens"], int(out["n_tokens"])))
            conts.append({"sample_index": chosen["sample_index"], "text": out["text"],
                          "n_tokens": int(out["n_tokens"]), "finish_reason": str(out["finish_reason"]),
                          "seed": req["seed"], "served_version": res.get("version"),
                          "n_images_sent": len(req["images"]), "prompt_sent": req["prompt"]})
        row["pairs"], row["continuations"] = json.dumps(pairs), json.dumps(conts)
        row["skipped"] = json.dumps(skipped)
    return _table(rows)


# ------------------------------------------------------------------------------------------------------ driver

def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 3) if values else None


def run_round(prompts_ds, *, client, round: int, policy_version: int, out_dir, samples_per_prompt: int = 8,
              temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 96, prompts_per_round: int = 128,
              max_pairs_per_prompt: int = 15, ntp_prefix_ratio: float = 0.5, dropout_ntp: bool = True,
              cot_instruction: str = "", seed: int = 0, chat_template: str | None = None,
              policy_dir: str | None = None, prompt_ids: list[str] | None = None, batch_size: int = 16,
              concurrency: int = 2, ntp_concurrency: int = 1, data_cpus: float = 0.25,
              progress=None) -> RoundStats:
    """Run one round (see the module docstring) and write `out_dir/round_XXXX/`; returns its RoundStats.

    `client`: a PolicyClient (or its app name, or a zero-arg factory). `policy_dir` / `chat_template`: where the
    Dropout-NTP continuation prompt's chat template comes from (needed when dropout_ntp). `prompt_ids`: all ids of
    `prompts_ds` when already known (saves a pass over the data). `batch_size` prompts per client call,
    `concurrency` rollout calls in flight: batch_size x concurrency x samples_per_prompt sequences (defaults: 256,
    vLLM's default max_num_seqs). `data_cpus`: logical CPUs per Ray Data task (the generation tasks mostly wait).
    `progress(samples_done, samples_total, pairs_done)` is called as finished prompts reach the driver.
    """
    import ray

    t_start = time.time()
    sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, round=round)
    renderer = PromptRenderer(policy_dir, chat_template) if dropout_ntp else None
    template = split_template(renderer) if dropout_ntp else None
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
        "ratio": ntp_prefix_ratio, "dropout_ntp": dropout_ntp})
    if dropout_ntp:
        ds = ds.map_batches(_continuations, batch_format="pyarrow", batch_size=batch_size, num_cpus=data_cpus,
                            compute=ray.data.TaskPoolStrategy(size=ntp_concurrency),
                            fn_kwargs={"client": client, "template": template,
                                       "renderer": None if template else renderer,
                                       "policy_version": policy_version, **sampling})
    rows: dict[str, dict] = {}
    duplicates = []
    n_samples = n_pairs = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            if row["id"] in rows:
                duplicates.append(row["id"])
            else:
                rows[row["id"]] = row
                n_samples += len(_loads(row.get("rollouts"), []))
                n_pairs += len(_loads(row.get("pairs"), []))
        if progress is not None:
            progress(n_samples, len(chosen) * samples_per_prompt, n_pairs)
    t_pipeline = time.time()
    count = renderer.count_tokens if renderer is not None and policy_dir is not None else None
    stats = _collect(rows, duplicates, chosen, Path(out_dir) / f"round_{round:04d}", round, policy_version, count)
    t_end = time.time()

    spans: dict[str, set] = {}
    for row in rows.values():
        for stage, ss in _loads(row.get("timings"), {}).items():
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


def _collect(rows: dict, duplicates: list, chosen: list, rdir: Path, round: int, policy_version: int,
             count_tokens) -> RoundStats:
    """The stream's rows -> pairs.parquet (in round order: reruns write identical files), rollouts.parquet,
    rejects.jsonl, and every statistic but the timings."""
    rdir.mkdir(parents=True, exist_ok=True)
    stats = RoundStats(round=round, policy_version=policy_version, prompts=len(chosen))
    pairs, samples, conts, rejects, skipped, served = [], [], [], [], Counter(), set()
    passed = []  # per ground-truth prompt: any sample correct
    for pid in chosen:
        row = rows.get(pid) or {"id": pid, "kind": None, "images": [], "rejects": json.dumps([{
            "stage": "select", "reason": "missing_row", "detail": "sampled id not produced by the pipeline"}])}
        rejects += [{"prompt_id": pid, **r} for r in _loads(row.get("rejects"), [])]
        skipped.update(_loads(row.get("skipped"), {}))
        result = _loads(row.get("result"), {})
        served.update([result["version"]] if result.get("version") is not None else [])
        rs = _loads(row.get("rollouts"), [])
        samples += [{**r, "kind": row["kind"], "source": "rollout", "served_version": result.get("version"),
                     "seed": result.get("seed"), "n_images_sent": len(row["images"])} for r in rs]
        conts += [{**c, "prompt_id": pid, "kind": row["kind"], "source": "ntp_continuation", "round": round,
                   "policy_version": policy_version} for c in _loads(row.get("continuations"), [])]
        if rs and not _dead(row):
            stats.qa_prompts += row["kind"] == "qa"
            stats.open_prompts += row["kind"] == "open"
            if row["answer"] is not None:
                passed.append(any(r["correct"] for r in rs))
        for d in _loads(row.get("pairs"), []):
            ct, rt = d.pop("chosen_tokens"), d.pop("rejected_tokens")
            if d["kind"] == "dropout_ntp":
                rt = rt + count_tokens(d["ntp_prefix"]) if count_tokens else None
            pairs.append((PreferencePair(**d, images=row["images"]), ct, rt))
    rejects += [{"prompt_id": pid, "stage": "select", "reason": "duplicate_id",
                 "detail": "the prompt dataset holds this id more than once; the first row was used"}
                for pid in duplicates]

    graded = [r for r in samples if r["correct"] is not None]
    stats.samples = len(samples)
    stats.tokens_generated = sum(int(r["n_tokens"]) for r in samples + conts)
    if graded:
        stats.sample_accuracy = _round(sum(r["correct"] for r in graded) / len(graded), 4)
        stats.format_failure_rate = _round(sum(r["final_answer"] is None for r in graded) / len(graded), 4)
        stats.pass_at_k = _round(sum(passed) / len(passed), 4)
    stats.pairs = dict(sorted(Counter(p.kind for p, _, _ in pairs).items()))
    stats.skipped = dict(sorted(skipped.items()))
    stats.mean_chars = {"chosen": _mean(len(p.chosen) for p, _, _ in pairs),
                        "rejected": _mean(len(p.rejected) for p, _, _ in pairs)}
    stats.mean_tokens = {"chosen": _mean(ct for _, ct, _ in pairs), "rejected": _mean(rt for _, _, rt in pairs)}
    stats.rejects = len(rejects)
    stats.rejects_by_reason = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    stats.served_versions = sorted(served)

    stats.files["pairs.parquet"] = write_parquet_atomic(pairs_to_table([p for p, _, _ in pairs]),
                                                        rdir / "pairs.parquet")
    table = pa.Table.from_pylist([{k: r.get(k) for k in ROLLOUT_SCHEMA.names} for r in samples + conts],
                                 schema=ROLLOUT_SCHEMA)
    stats.files["rollouts.parquet"] = write_parquet_atomic(table, rdir / "rollouts.parquet")
    stats.files["rejects.jsonl"] = write_text_atomic(
        rdir / "rejects.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))
    return stats

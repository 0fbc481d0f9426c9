"""What a rollout round leaves behind: its files (pairs.parquet, rollouts.parquet, rejects.jsonl) and statistics.

`collect_round` is the driver's last step of mpo_online.rollout.pipeline.run_round: it takes the stream's finished
work rows (rollout_pipeline.WORK_SCHEMA, nested values as JSON strings) in round order and writes the files; rerun
with the same rows it writes byte-identical files. `RoundStats` is what run_round returns (and the loop records).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from mpo_online.data.records import PreferencePair, pairs_to_table, write_parquet_atomic, write_text_atomic

ROLLOUT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("kind", pa.string()), ("source", pa.string()), ("round", pa.int32()),
    ("policy_version", pa.int32()), ("served_version", pa.int32()), ("sample_index", pa.int32()),
    ("text", pa.string()), ("n_tokens", pa.int32()), ("finish_reason", pa.string()), ("final_answer", pa.string()),
    ("correct", pa.bool_()), ("seed", pa.int64()), ("n_images_sent", pa.int32()),
    ("token_ids", pa.list_(pa.int32())), ("logprobs", pa.list_(pa.float32())),  # as the engine sampled / scored them
    ("prompt_token_ids", pa.list_(pa.int32())),  # the prompt the engine saw (image tokens expanded; NTP: + prefix)
])
round_ = round  # collect_round takes a `round` argument (the name the loop uses everywhere)


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


def json_field(value, default):
    return json.loads(value) if value else default


def dead_row(row: dict) -> bool:
    return any(r["stage"] in ("select", "rollout") for r in json_field(row.get("rejects"), []))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 3) if values else None


def collect_round(rows: dict, duplicates: list, chosen: list, rdir: Path, round: int,
                  policy_version: int) -> RoundStats:
    """The stream's rows -> pairs.parquet (in round order: reruns write identical files), rollouts.parquet,
    rejects.jsonl, and every statistic but the timings."""
    rdir.mkdir(parents=True, exist_ok=True)
    stats = RoundStats(round=round, policy_version=policy_version, prompts=len(chosen))
    pairs, samples, conts, rejects, skipped, served = [], [], [], [], Counter(), set()
    passed = []  # per ground-truth prompt: any sample correct
    for pid in chosen:
        row = rows.get(pid) or {"id": pid, "kind": None, "images": [], "rejects": json.dumps([{
            "stage": "select", "reason": "missing_row", "detail": "sampled id not produced by the pipeline"}])}
        rejects += [{"prompt_id": pid, **r} for r in json_field(row.get("rejects"), [])]
        skipped.update(json_field(row.get("skipped"), {}))
        result = json_field(row.get("result"), {})
        served.update([result["version"]] if result.get("version") is not None else [])
        rs = json_field(row.get("rollouts"), [])
        samples += [{**r, "kind": row["kind"], "source": "rollout", "served_version": result.get("version"),
                     "seed": result.get("seed"), "n_images_sent": len(row["images"]),
                     "prompt_token_ids": result.get("prompt_token_ids")} for r in rs]
        conts += [{**c, "prompt_id": pid, "kind": row["kind"], "source": "ntp_continuation", "round": round,
                   "policy_version": policy_version} for c in json_field(row.get("continuations"), [])]
        if rs and not dead_row(row):
            stats.qa_prompts += row["kind"] == "qa"
            stats.open_prompts += row["kind"] == "open"
            if row["answer"] is not None:
                passed.append(any(r["correct"] for r in rs))
        for d in json_field(row.get("pairs"), []):
            ct, rt = d.pop("chosen_tokens"), d.pop("rejected_tokens")
            pairs.append((PreferencePair(**d, images=row["images"]), ct, rt))
    rejects += [{"prompt_id": pid, "stage": "select", "reason": "duplicate_id",
                 "detail": "the prompt dataset holds this id more than once; the first row was used"}
                for pid in duplicates]

    graded = [r for r in samples if r["correct"] is not None]
    stats.samples = len(samples)
    stats.tokens_generated = sum(int(r["n_tokens"]) for r in samples + conts)
    if graded:
        stats.sample_accuracy = round_(sum(r["correct"] for r in graded) / len(graded), 4)
        stats.format_failure_rate = round_(sum(r["final_answer"] is None for r in graded) / len(graded), 4)
        stats.pass_at_k = round_(sum(passed) / len(passed), 4)
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

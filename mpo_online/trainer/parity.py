"""Engine/trainer log-prob parity: does the trainer score exactly the distribution the engine sampled?

    report = round_parity(round_dir, policy_dir)       # a round written by mpo_online.rollout.pipeline.run_round

For every pair in `round_dir/pairs.parquet` it runs the trainer's own batching (PairCollator) and per-token log-probs
(`mpo_online.trainer.logps.token_logps`, fp32) on the policy that sampled the round, and compares them with what
the engine reported when it sampled (rollouts.parquet / the pairs' `*_logprobs`):

- chosen and correctness-rejected responses: per-token |trainer - engine| under the pair's prompt (with the image),
  and the prompt token ids the trainer built against the ones the engine used;
- Dropout-NTP rejecteds: the continuation part, scored under the text-only prompt it was sampled with (prompt
  without the image + the chosen's first k tokens), against the continuation's engine log-probs;
- the response targets against the sampled ids (so no end-of-turn token is appended to a truncated response).

It also scores the same pairs through the text path (token ids dropped: the collator re-tokenizes the detokenized
text) and reports per-sequence |sum trainer - sum engine| for both, and counts the pairs whose samples the text path
cannot reproduce (special tokens that detokenization drops, truncated responses that get an EOS appended).
Used by tests/test_parity.py and benchmarks/logprob_parity.py; needs torch and transformers, not Ray.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from mpo_online.data.records import message_text, user_message

KINDS = ("correctness_chosen", "correctness_rejected", "ntp_chosen", "ntp_continuation")


def _summary(deltas: list[float], unit: str = "tokens") -> dict:
    return {unit: len(deltas), "mean_abs": sum(deltas) / len(deltas) if deltas else None,
            "max_abs": max(deltas) if deltas else None}


def _targets(batch, logps, s: int) -> tuple[list[int], list[float], list[int]]:
    """Sequence s of a collated batch: (response target ids, their trainer log-probs, prompt ids)."""
    labels = batch.tensors["labels"][s]                                 # (T,)
    mask = labels != -100
    first = int(mask.nonzero()[0, 0])
    return labels[mask].tolist(), logps[s][mask].tolist(), batch.tensors["input_ids"][s, :first].tolist()


def _score(collator, model, rows: list[dict], chunk: int = 8):
    """Yield (index of the chunk's first row, its PairBatch, (S, T) trainer log-probs) over `rows` in chunks."""
    import torch

    from mpo_online.trainer.logps import token_logps

    for i in range(0, len(rows), chunk):
        batch = collator(rows[i:i + chunk])
        with torch.no_grad():
            logps = token_logps(model, batch.tensors)                    # (S, T) fp32, 0 off-target
        yield i, batch, logps


def _continuation_of(row: dict, samples: list[dict], conts: list[dict]) -> dict | None:
    """The continuation record of a Dropout-NTP pair: the one requested for the pair's chosen sample (same prompt,
    same sample index), if the pair's rejected ids are that sample's first k ids + the continuation's."""
    index = next((r["sample_index"] for r in samples if r["token_ids"] == row["chosen_token_ids"]), None)
    rej, chosen = row["rejected_token_ids"], row["chosen_token_ids"]
    for c in conts:
        k = len(rej) - len(c["token_ids"])
        if c["sample_index"] == index and k > 0 and rej[k:] == c["token_ids"] and rej[:k] == chosen[:k]:
            return c
    return None


def round_parity(round_dir, policy_dir, *, max_length: int = 2048, text_path: bool = True) -> dict:
    """The parity report of one round (see the module docstring)."""
    import pyarrow.parquet as pq

    from mpo_online.trainer.batching import PairCollator
    from mpo_online.trainer.logps import load_model

    rdir = Path(round_dir)
    everything = pq.read_table(rdir / "pairs.parquet").to_pylist()
    rows = [r for r in everything if r.get("chosen_token_ids") and r.get("rejected_token_ids")]  # text-only: skip
    rollouts = pq.read_table(rdir / "rollouts.parquet").to_pylist()
    prompt_ids = {r["prompt_id"]: r["prompt_token_ids"] for r in rollouts if r["source"] == "rollout"}
    by_source = {"rollout": defaultdict(list), "ntp_continuation": defaultdict(list)}  # source -> prompt id -> rows
    for r in rollouts:
        by_source[r["source"]][r["prompt_id"]].append(r)
    model = load_model(policy_dir)
    collator = PairCollator.from_pretrained(policy_dir, max_length=max_length, pairs=True)
    tok = collator.tokenizer
    dropped = {t for t in range(len(tok)) if tok.decode([t], skip_special_tokens=True) == ""}

    deltas = {k: [] for k in KINDS}
    report = {"pairs": len(rows), "pairs_without_ids": len(everything) - len(rows), "prompt_mismatches": 0,
              "target_mismatches": 0, "missing_engine_logprobs": 0, "truncated_with_eos": 0,
              "pairs_with_dropped_tokens": 0, "pairs_truncated": 0}
    seq_delta = {"ids": [], "text": []}  # per sequence |sum trainer - sum engine|, where the engine's sums exist

    def compare(kind, engine_lps, trainer_lps) -> bool:
        if engine_lps is None or len(engine_lps) != len(trainer_lps):
            report["missing_engine_logprobs"] += 1
            return False
        deltas[kind].extend(abs(a - b) for a, b in zip(trainer_lps, engine_lps))
        return True

    for i, batch, logps in _score(collator, model, rows):
        B = batch.n_pairs
        for b in range(B):
            row = rows[i + b]
            ntp = row["kind"] == "dropout_ntp"
            for s, side in ((b, "chosen"), (B + b, "rejected")):
                ids, lps, prompt = _targets(batch, logps, s)
                sampled, engine = row[f"{side}_token_ids"], row[f"{side}_logprobs"]
                report["prompt_mismatches"] += prompt != prompt_ids.get(row["prompt_id"])
                report["target_mismatches"] += ids != sampled
                report["truncated_with_eos"] += (ids[-1] in collator.eos_ids) != (sampled[-1] in collator.eos_ids)
                if ntp and side == "rejected":
                    continue  # its engine log-probs were taken without the image: scored below
                if compare(("ntp_" if ntp else "correctness_") + side, engine, lps):
                    seq_delta["ids"].append(abs(sum(lps) - sum(engine)))
            sampled = row["chosen_token_ids"] + row["rejected_token_ids"]
            report["pairs_with_dropped_tokens"] += any(t in dropped for t in sampled if t not in collator.eos_ids)
            report["pairs_truncated"] += any(row[f"{w}_token_ids"][-1] not in collator.eos_ids
                                             for w in ("chosen", "rejected"))

    # Dropout-NTP continuations: the rejected ids under the text-only prompt they were sampled with.
    ntp_rows, ntp_conts = [], []
    for row in rows:
        if row["kind"] != "dropout_ntp":
            continue
        cont = _continuation_of(row, by_source["rollout"][row["prompt_id"]],
                                by_source["ntp_continuation"][row["prompt_id"]])
        if cont is None:
            report["missing_engine_logprobs"] += 1
            continue
        ntp_rows.append({"pair_id": row["pair_id"], "prompt": user_message(message_text(row["prompt"]), 0),
                         "images": [], "chosen": row["rejected"], "chosen_token_ids": row["rejected_token_ids"]})
        ntp_conts.append(cont)
    text_only = PairCollator.from_pretrained(policy_dir, max_length=max_length, pairs=False)
    for i, batch, logps in _score(text_only, model, ntp_rows):
        for b in range(batch.n_pairs):
            cont = ntp_conts[i + b]
            ids, lps, prompt = _targets(batch, logps, b)
            k = len(ids) - len(cont["token_ids"])
            report["prompt_mismatches"] += prompt + ids[:k] != cont["prompt_token_ids"]
            compare("ntp_continuation", cont["logprobs"], lps[k:])

    if text_path:  # the same pairs with their token ids dropped: what the trainer saw before they were recorded
        plain = [{k: v for k, v in r.items() if not k.endswith(("_token_ids", "_logprobs"))} for r in rows]
        for i, batch, logps in _score(collator, model, plain):
            B = batch.n_pairs
            for b in range(B):
                row = rows[i + b]
                for s, side in ((b, "chosen"), (B + b, "rejected")):
                    engine = row[f"{side}_logprobs"]
                    if engine is not None:
                        seq_delta["text"].append(abs(sum(_targets(batch, logps, s)[1]) - sum(engine)))

    report["per_token"] = {k: _summary(v) for k, v in deltas.items()}
    report["per_token"]["all"] = _summary([d for v in deltas.values() for d in v])
    report["per_sequence_sum"] = {k: _summary(v, "sequences") for k, v in seq_delta.items() if v or k == "ids"}
    return report

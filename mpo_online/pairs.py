"""The MPO preference-data rules, as pure functions: which prompts a round samples, how sampled responses become
correctness pairs, and how Dropout-NTP pairs are built. No Ray and no I/O; mpo_online.rollout.pipeline runs these
inside Ray Data stages, and tests/test_pairs.py checks them on hand-worked cases. Nothing here is launched directly.

Rules (arXiv 2411.10442 and its reference data pipeline):
- Correctness pairs, for prompts with a ground truth: a response whose final answer matches the gold answer is a
  positive; a wrong or unparseable one is a negative. Duplicate response texts are dropped first; every
  positive x negative is a candidate; a candidate is skipped when the positive's final answer is a (case-insensitive)
  substring of the negative's final answer (the reference code's "entailment" skip: "5" vs "15" is not a clean
  contrast). We compare answers, not the negative's whole text: a wrong chain of thought usually mentions the right
  number somewhere ("I see 3 red... 3 + 2 = 6"), and a text rule would discard most numeric pairs. A negative with
  no parseable answer is never skipped by this rule. At most `max_pairs` candidates per prompt, a seeded choice.
  Prompts whose unique responses are all right or all wrong give no pairs.
- Optional chosen-side check (not in the paper; config pairs.chosen_check): a `chosen_ok(text)` predicate a positive
  must also pass, e.g. "its chain holds together" (mpo_online.synthetic.chains.chosen_checker, which knows the chain
  format). A correct response failing it is neither positive nor negative: teaching it as chosen would reward a lucky
  chain, and rejecting it would push down a right answer. It is applied only to prompts that have both right and
  wrong responses (so all_correct / all_wrong count the same under every check).
- Dropout-NTP, for prompts without ground truth: chosen = a response sampled WITH the image; keep its first
  `ratio` of the words; the same policy continues that prefix WITHOUT the image; rejected = prefix + continuation.

Token ids: pairs carry the responses' sampled token ids and engine log-probs (mpo_online.data.records), so the prefix is
cut on a token boundary: the first k tokens of the chosen response, k the number of tokens whose text makes up the
word prefix exactly (from the engine's per-token text offsets); a prefix that ends inside a token is skipped. The
continuation is requested from those k token ids, so rejected ids = chosen ids[:k] + continuation ids. A sampled
response holding an input placeholder token (e.g. `<image>`) cannot be scored by the trainer, whose forward would
take it for an image slot: such responses are left out of pairs.

`skipped` counters use these keys (unit in brackets): duplicate_response / placeholder_token_in_response /
chosen_check_failed (correct responses the chosen-side check left out) [responses], all_correct / all_wrong /
no_checked_positive (no correct response passed the chosen-side check) / no_samples / no_pairs_left [prompts],
answer_in_rejected / over_cap [candidate pairs], truncated_chosen / empty_prefix / ntp_no_token_boundary /
ntp_same_as_chosen [Dropout-NTP chosen responses].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import replace

from mpo_online.data.records import PreferencePair, Rollout, strip_placeholders
from mpo_online.reward.verify import answers_match, extract_final_answer
from mpo_online.synthetic.chains import chosen_checker, row_meta


def derive_seed(*parts) -> int:
    """A seed for a named sub-stream, stable across processes and Python versions (no `hash()`), < 2**31 so every
    sampler (vLLM, numpy, random) accepts it. vLLM gives the i-th of n samples seed + i, which stays in int64."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


# ------------------------------------------------------------------------------------------------ prompt sampling

def _epoch_orders(ids: list[str], per_round: int, seed: int, last_epoch: int) -> list[list[str]]:
    """The order each epoch 0..last_epoch hands out the ids in.

    An epoch is a seeded permutation; consecutive rounds take consecutive slices of the concatenated orders. A round
    that straddles two epochs takes the tail of epoch e and the head of epoch e+1, and must not get an id twice: so
    epoch e+1's order starts with the first ids of its permutation that are not in that tail, and the tail ids it
    skipped follow later in permutation order. Every epoch still hands out every id exactly once."""
    n = len(ids)
    orders: list[list[str]] = []
    for e in range(last_epoch + 1):
        perm = list(ids)
        random.Random(derive_seed(seed, "prompt-epoch", e)).shuffle(perm)
        if e > 0:
            tail_len = (e * n) % per_round  # positions of epoch e-1 inside the straddling round
            if tail_len:
                tail = set(orders[-1][n - tail_len:])
                head = [x for x in perm if x not in tail][: per_round - tail_len]
                taken = set(head)
                perm = head + [x for x in perm if x not in taken]
        orders.append(perm)
    return orders


def sample_round_prompts(prompt_ids, round: int, per_round: int, seed: int) -> list[str]:
    """The prompt ids round `round` samples: without replacement across rounds until the pool is exhausted, then a
    new seeded permutation (an epoch). Deterministic in (set of ids, round, per_round, seed): input order does not
    matter and no state is kept, so a resumed run samples the same prompts. Never repeats an id within a round;
    `per_round` above the pool size gives the whole pool every round."""
    ids = sorted(set(prompt_ids))
    if not ids or per_round <= 0:
        return []
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    n, k = len(ids), min(per_round, len(ids))
    start, stop = round * k, (round + 1) * k
    orders = _epoch_orders(ids, k, seed, (stop - 1) // n)
    return [orders[p // n][p % n] for p in range(start, stop)]


# ------------------------------------------------------------------------------------------- correctness pairs

def label_rollout(rollout: Rollout, gold: str | None) -> Rollout:
    """The rollout with its final answer extracted and, when there is a gold answer, its verdict."""
    answer = extract_final_answer(rollout.text)
    correct = None if gold is None else (answer is not None and answers_match(answer, gold))
    return replace(rollout, final_answer=answer, correct=correct)


def dedupe_rollouts(rollouts: list[Rollout]) -> tuple[list[Rollout], int]:
    """Rollouts in sample order with repeated texts (compared stripped) dropped; the first occurrence is kept."""
    seen, kept = set(), []
    for r in sorted(rollouts, key=lambda r: r.sample_index):
        key = r.text.strip()
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept, len(rollouts) - len(kept)


def drop_placeholder_samples(rollouts: list[Rollout], placeholder_ids) -> tuple[list[Rollout], int]:
    """Rollouts whose token ids hold none of `placeholder_ids` (input-only tokens such as `<image>`), and how many
    were dropped. Rollouts without token ids are kept."""
    bad = set(placeholder_ids or ())
    kept = [r for r in rollouts if not (bad and r.token_ids and bad.intersection(r.token_ids))]
    return kept, len(rollouts) - len(kept)


def _capped(candidates: list, max_pairs: int, rng_seed: int, skipped: Counter) -> list:
    """At most max_pairs candidates: a seeded choice, returned in candidate order (stable across reruns)."""
    if len(candidates) <= max_pairs:
        return candidates
    skipped["over_cap"] += len(candidates) - max_pairs
    keep = sorted(random.Random(rng_seed).sample(range(len(candidates)), max_pairs))
    return [candidates[i] for i in keep]


def correctness_pairs(prompt_row: dict, rollouts: list[Rollout], *, max_pairs: int, round: int,
                      policy_version: int, rng_seed: int, chosen_ok=None) -> tuple[list[PreferencePair], Counter]:
    """Correctness pairs of one prompt (see the module docstring) and the skip counts.

    `prompt_row` is a prompt-schema row whose `question` is the text the policy was asked (instructions included:
    that is what the trainer must condition on). Rollouts without a verdict are labelled here. `chosen_ok`: the
    optional chosen-side check (text -> bool) a correct response must pass to be a positive; None: any."""
    skipped: Counter = Counter()
    gold = prompt_row.get("answer")
    if gold is None:
        raise ValueError(f"prompt {prompt_row.get('id')!r} has no gold answer: use Dropout-NTP pairs")
    labelled = [r if r.correct is not None else label_rollout(r, gold) for r in rollouts]
    unique, n_dup = dedupe_rollouts(labelled)
    if n_dup:
        skipped["duplicate_response"] += n_dup
    positives = [r for r in unique if r.correct]
    negatives = [r for r in unique if not r.correct]
    if not unique:
        skipped["no_samples"] += 1
        return [], skipped
    if not negatives:
        skipped["all_correct"] += 1
        return [], skipped
    if not positives:
        skipped["all_wrong"] += 1
        return [], skipped
    if chosen_ok is not None:
        checked = [r for r in positives if chosen_ok(r.text)]
        if len(checked) < len(positives):
            skipped["chosen_check_failed"] += len(positives) - len(checked)
        positives = checked
        if not positives:
            skipped["no_checked_positive"] += 1
            return [], skipped
    candidates = []
    for pos in positives:
        for neg in negatives:
            if neg.final_answer is not None and pos.final_answer.casefold() in neg.final_answer.casefold():
                skipped["answer_in_rejected"] += 1
                continue
            candidates.append((pos, neg))
    if not candidates:
        skipped["no_pairs_left"] += 1
        return [], skipped
    pairs = []
    for pos, neg in _capped(candidates, max_pairs, rng_seed, skipped):
        pairs.append(PreferencePair(
            pair_id=PreferencePair.make_id(prompt_row["id"], "correctness", pos.text, neg.text),
            prompt_id=prompt_row["id"], kind="correctness", question=prompt_row["question"],
            images=list(prompt_row.get("images") or []), chosen=pos.text, rejected=neg.text, round=round,
            policy_version=policy_version, gold_answer=gold, chosen_answer=pos.final_answer,
            rejected_answer=neg.final_answer, chosen_correct=True, rejected_correct=False,
            # both were sampled under this very prompt (with the image): the engine's log-probs are pi(y | x)
            chosen_token_ids=pos.token_ids, chosen_logprobs=pos.logprobs,
            rejected_token_ids=neg.token_ids, rejected_logprobs=neg.logprobs))
    return pairs, skipped


# ------------------------------------------------------------------------------------------------- Dropout-NTP

_WORD = re.compile(r"\S+")


def ntp_prefix(text: str, ratio: float) -> str:
    """The first int(n_words * ratio) whitespace-separated words of `text`, with the original spacing between them
    (and any leading whitespace); no trailing whitespace. "" when that is zero words."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    ends = [m.end() for m in _WORD.finditer(text)]
    keep = int(len(ends) * ratio)
    return text[: ends[keep - 1]] if keep else ""


def prefix_token_count(rollout: Rollout, prefix: str) -> int | None:
    """k such that the rollout's first k tokens make up exactly `prefix` (a prefix of its text), from its per-token
    text offsets; the smallest such k (tokens without text right after the prefix belong to the continuation). None
    when the prefix ends inside a token, or the rollout has no token offsets."""
    if not rollout.text.startswith(prefix) or not rollout.text_offsets:
        return None
    for k, end in enumerate(rollout.text_offsets, start=1):
        if end >= len(prefix):
            return k if end == len(prefix) else None
    return None


def ntp_chosen(rollouts: list[Rollout], *, max_pairs: int, ratio: float,
               rng_seed: int) -> tuple[list[tuple[Rollout, str, int]], Counter]:
    """The (chosen rollout, prefix, k prefix tokens) Dropout-NTP pairs of one open prompt will be built from.

    Unique responses only; a response cut off by the token limit is not a good "chosen" (skipped as
    truncated_chosen); one too short to leave a non-empty prefix is skipped as empty_prefix; one whose word prefix
    is not a whole number of tokens (or without token offsets) as ntp_no_token_boundary; then at most max_pairs, a
    seeded choice."""
    skipped: Counter = Counter()
    unique, n_dup = dedupe_rollouts(rollouts)
    if n_dup:
        skipped["duplicate_response"] += n_dup
    if not unique:
        skipped["no_samples"] += 1
        return [], skipped
    candidates = []
    for r in unique:
        if r.finish_reason == "length":
            skipped["truncated_chosen"] += 1
            continue
        prefix = ntp_prefix(r.text, ratio)
        if not prefix:
            skipped["empty_prefix"] += 1
            continue
        k = prefix_token_count(r, prefix)
        if k is None:
            skipped["ntp_no_token_boundary"] += 1
            continue
        candidates.append((r, prefix, k))
    if not candidates:
        skipped["no_pairs_left"] += 1
    return _capped(candidates, max_pairs, rng_seed, skipped), skipped


def text_only_messages(question: str) -> list[dict]:
    """The prompt as one text-only user turn (the image and its placeholders dropped), for the chat template."""
    return [{"role": "user", "content": [{"type": "text", "text": strip_placeholders(question)}]}]


def ntp_continuation_request(question: str, prefix_token_ids: list[int], *, temperature: float, top_p: float,
                             max_tokens: int, seed: int) -> dict:
    """The request asking the policy to continue the chosen response's first tokens without the image.

    The server renders `text_only_messages(question)` with the generation prompt and appends `prefix_token_ids`
    (serving.server `assistant_prefix_token_ids`): no image travels, and nothing is re-tokenized."""
    return {"messages": text_only_messages(question), "assistant_prefix_token_ids": list(prefix_token_ids), "n": 1,
            "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed, "logprobs": True,
            "return_prompt_token_ids": True}


def ntp_pair(prompt_row: dict, chosen: Rollout, prefix: str, continuation: str, *, round: int, policy_version: int,
             prefix_tokens: int | None = None, continuation_token_ids: list[int] | None = None
             ) -> PreferencePair | None:
    """A Dropout-NTP pair: chosen = the response sampled with the image; rejected = prefix + the image-less
    continuation. `prompt_row["question"]` is the question as asked (instructions included). With the chosen's
    token ids, `prefix_tokens` (k) and the continuation's ids, rejected ids = chosen ids[:k] + continuation ids;
    the rejected's log-probs stay None (the continuation was sampled without the image: not this prompt's).

    None when the continuation reproduces the chosen response (compared stripped): such a pair carries no
    preference, and it happens whenever the image did not matter for the rest of the answer (callers count it as
    `ntp_same_as_chosen`)."""
    if not chosen.text.startswith(prefix):
        raise ValueError("prefix is not a prefix of the chosen response")
    rejected = prefix + continuation
    if rejected.strip() == chosen.text.strip():
        return None
    rejected_ids = None
    if chosen.token_ids is not None and prefix_tokens is not None and continuation_token_ids is not None:
        rejected_ids = list(chosen.token_ids[:prefix_tokens]) + list(continuation_token_ids)
    return PreferencePair(
        pair_id=PreferencePair.make_id(prompt_row["id"], "dropout_ntp", chosen.text, rejected),
        prompt_id=prompt_row["id"], kind="dropout_ntp", question=prompt_row["question"],
        images=list(prompt_row.get("images") or []), chosen=chosen.text, rejected=rejected, round=round,
        policy_version=policy_version, gold_answer=prompt_row.get("answer"), ntp_prefix=prefix,
        chosen_token_ids=chosen.token_ids, chosen_logprobs=chosen.logprobs, rejected_token_ids=rejected_ids)


def rft_examples(rollout_rows: list[dict], prompts_by_id: dict[str, dict], *, max_per_prompt: int,
                 cot_instruction: str = "", chosen_check: str = "answer", mixed_repeats: int = 1
                 ) -> list[PreferencePair]:
    """The rejection-sampling baseline's data: SFT examples from correct samples (distinct texts, capped per prompt).

    `rollout_rows` are a round's rollouts.parquet rows (verdict in `correct`); continuations are not samples.
    `chosen_check` (config pairs.chosen_check): a correct sample failing the prompt's chosen-side check
    (chains.chosen_checker, from the prompt row's meta) is not an example, as it would not be a chosen response.
    `mixed_repeats` (config sft.mixed_repeats): the examples of a prompt that also drew a wrong sample (a prompt
    the policy still gets wrong sometimes: one that gives correctness pairs) are listed this many times, each copy
    with its own pair_id, after all the first copies.
    """
    seen: dict[str, set] = {}
    checkers: dict[str, object] = {}  # prompt id -> chosen_ok or None, built once per prompt
    out, mixed = [], set()  # mixed: prompts that drew a wrong sample
    for r in rollout_rows:
        prompt = prompts_by_id.get(r["prompt_id"])
        if r.get("correct") is False and r.get("source") == "rollout":
            mixed.add(r["prompt_id"])
        if not r.get("correct") or r.get("source") != "rollout" or prompt is None:
            continue
        texts = seen.setdefault(r["prompt_id"], set())
        if r["text"] in texts or len(texts) >= max_per_prompt:
            continue
        if r["prompt_id"] not in checkers:
            checkers[r["prompt_id"]] = chosen_checker(chosen_check, row_meta(prompt))
        chosen_ok = checkers[r["prompt_id"]]
        if chosen_ok is not None and not chosen_ok(r["text"]):
            continue
        texts.add(r["text"])
        out.append(PreferencePair(
            pair_id=PreferencePair.make_id(r["prompt_id"], "sft", r["text"], None), prompt_id=r["prompt_id"],
            kind="sft", question=prompt["question"] + cot_instruction, images=list(prompt["images"]),
            chosen=r["text"], rejected=None, round=int(r["round"]), policy_version=int(r["policy_version"]),
            gold_answer=prompt.get("answer"), chosen_answer=r.get("final_answer"), chosen_correct=True,
            chosen_token_ids=r.get("token_ids"), chosen_logprobs=r.get("logprobs")))
    repeats = [dataclasses.replace(e, pair_id=PreferencePair.make_id(e.prompt_id, f"sft#{k}", e.chosen, None))
               for k in range(1, mixed_repeats) for e in out if e.prompt_id in mixed]
    return out + repeats

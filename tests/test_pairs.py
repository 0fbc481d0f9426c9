"""Pure tests of mpo_online.pairs: hand-worked cases for prompt sampling, correctness pairs, Dropout-NTP."""

import json
from collections import Counter

import pytest

from mpo_online.data.records import PreferencePair, Rollout
from mpo_online.pairs import (
    correctness_pairs,
    dedupe_rollouts,
    derive_seed,
    drop_placeholder_samples,
    label_rollout,
    ntp_chosen,
    ntp_continuation_request,
    ntp_pair,
    ntp_prefix,
    prefix_token_count,
    rft_examples,
    sample_round_prompts,
    text_only_messages,
)
from mpo_online.synthetic.chains import chosen_checker, row_meta, worked_solution

PROMPT = {"id": "p1", "question": "How many red shapes are there?", "images": [b"png"], "answer": "3", "kind": "qa"}


VOCAB: dict[str, int] = {}  # token text -> id, for the rollouts below


def ro(i, text, finish="stop", pieces=None):
    """A rollout sampled as `pieces` (token texts; default one token per character; "" stands for a token that
    detokenization drops, e.g. a special token), ids 1000+ per distinct piece, log-probs -0.1 * position."""
    pieces = list(text) if pieces is None else pieces
    assert "".join(pieces) == text
    ends = [sum(len(p) for p in pieces[:k + 1]) for k in range(len(pieces))]
    return Rollout(prompt_id="p1", round=0, policy_version=0, sample_index=i, text=text, n_tokens=len(pieces),
                   finish_reason=finish, token_ids=[VOCAB.setdefault(p, 1000 + len(VOCAB)) for p in pieces],
                   logprobs=[-0.1 * k for k in range(len(pieces))], text_offsets=ends)


def build(texts, max_pairs=15, seed=0):
    return correctness_pairs(PROMPT, [ro(i, t) for i, t in enumerate(texts)], max_pairs=max_pairs, round=2,
                             policy_version=5, rng_seed=seed)


# ----------------------------------------------------------------------------------------- prompt sampling

def test_sampling_without_replacement_then_new_epoch():
    ids = [f"q{i}" for i in range(10)]
    rounds = [sample_round_prompts(ids, r, 4, seed=7) for r in range(10)]  # 40 draws = 4 epochs of 10
    assert all(len(r) == 4 and len(set(r)) == 4 for r in rounds)  # no repeat inside a round, even straddling
    stream = [x for r in rounds for x in r]
    for e in range(4):  # every epoch hands out every id exactly once
        assert sorted(stream[10 * e:10 * e + 10]) == sorted(ids)
    assert stream[:10] != stream[10:20]  # a fresh permutation per epoch


def test_sampling_deterministic_and_order_free():
    ids = [f"q{i}" for i in range(50)]
    a = sample_round_prompts(ids, 3, 8, seed=1)
    assert a == sample_round_prompts(list(reversed(ids)), 3, 8, seed=1)  # input order does not matter
    assert a != sample_round_prompts(ids, 3, 8, seed=2)
    assert sample_round_prompts(ids, 0, 100, seed=1) == sample_round_prompts(ids, 0, 50, seed=1)  # clamped to pool
    assert sorted(sample_round_prompts(ids, 0, 100, seed=1)) == sorted(ids)
    assert sample_round_prompts([], 0, 4, seed=1) == []


def test_straddling_round_skips_the_previous_tail():
    # 5 ids, 3 per round: round 1 takes positions 3,4 of epoch 0 and position 0 of epoch 1.
    ids = list("abcde")
    r0, r1, r2, r3 = (sample_round_prompts(ids, r, 3, seed=3) for r in range(4))
    assert sorted(r0 + r1[:2]) == ids and len(set(r1)) == 3
    assert sorted(r1[2:] + r2 + r3[:1]) == ids  # epoch 1 = positions 5..9


# --------------------------------------------------------------------------------------- correctness pairs

def test_labels_and_every_positive_times_negative():
    texts = ["Final answer: 3", "I see 3.\nFinal answer: 3", "Final answer: 4", "no idea", "Final answer: 7"]
    pairs, skipped = build(texts)
    # positives: 0, 1; negatives: 2 (wrong), 3 (unparseable), 4 (wrong) -> 2 x 3 = 6 pairs
    assert len(pairs) == 6 and not skipped
    assert {(p.chosen, p.rejected) for p in pairs} == {(c, r) for c in texts[:2] for r in texts[2:]}
    for p in pairs:
        assert p.kind == "correctness" and p.chosen_correct is True and p.rejected_correct is False
        assert p.chosen_answer == "3" and p.gold_answer == "3" and p.round == 2 and p.policy_version == 5
        assert p.images == [b"png"] and p.question == PROMPT["question"]
        assert p.pair_id == PreferencePair.make_id("p1", "correctness", p.chosen, p.rejected)
    assert {p.rejected_answer for p in pairs} == {"4", None, "7"}
    by_text = {r.text: r for r in (ro(i, t) for i, t in enumerate(texts))}
    for p in pairs:  # the sampled ids and engine log-probs travel with each response
        assert p.chosen_token_ids == by_text[p.chosen].token_ids and p.chosen_logprobs == by_text[p.chosen].logprobs
        assert p.rejected_token_ids == by_text[p.rejected].token_ids
        assert p.rejected_logprobs == by_text[p.rejected].logprobs


def test_placeholder_samples_dropped():
    image = ro(1, "Final answer: 3", pieces=["Final answer: ", "", "3"])  # the "" piece: a sampled <image>
    image_id = image.token_ids[1]
    kept, n = drop_placeholder_samples([ro(0, "Final answer: 3"), image, ro(2, "x")], [image_id])
    assert [r.sample_index for r in kept] == [0, 2] and n == 1
    assert drop_placeholder_samples([image], [])[1] == 0
    no_ids = Rollout(prompt_id="p1", round=0, policy_version=0, sample_index=3, text="a", n_tokens=1,
                     finish_reason="stop")
    assert drop_placeholder_samples([no_ids], [image_id]) == ([no_ids], 0)


def test_duplicates_dropped_before_pairing():
    pairs, skipped = build(["Final answer: 3", " Final answer: 3 ", "Final answer: 4", "Final answer: 4"])
    assert len(pairs) == 1 and skipped == Counter(duplicate_response=2)


def test_answer_substring_skip():
    # positive "3" is a substring of negative answers "13" and "3.5": skipped; "4" and unparseable kept.
    pairs, skipped = build(["Final answer: 3", "Final answer: 13", "Final answer: 3.5", "Final answer: 4",
                            "it is 3 maybe"])
    assert skipped["answer_in_rejected"] == 2
    assert sorted(p.rejected for p in pairs) == ["Final answer: 4", "it is 3 maybe"]  # text mentioning 3 is kept


def test_all_correct_all_wrong_and_empty():
    pairs, skipped = build(["Final answer: 3", "So: Final answer: 3."])
    assert pairs == [] and skipped == Counter(all_correct=1)
    pairs, skipped = build(["Final answer: 2", "garbage", "garbage"])
    assert pairs == [] and skipped == Counter(all_wrong=1, duplicate_response=1)
    pairs, skipped = build([])
    assert pairs == [] and skipped == Counter(no_samples=1)
    pairs, skipped = build(["Final answer: 3", "Final answer: 33"])
    assert pairs == [] and skipped == Counter(answer_in_rejected=1, no_pairs_left=1)


def test_cap_is_a_seeded_choice():
    texts = [f"v{i} Final answer: 3" for i in range(4)] + [f"Final answer: {i}" for i in range(4, 9)]  # 4 x 5 = 20
    pairs, skipped = build(texts, max_pairs=15, seed=11)
    assert len(pairs) == 15 and skipped == Counter(over_cap=5)
    again, _ = build(list(reversed(texts)), max_pairs=15, seed=11)  # rollouts are ordered by sample_index
    assert [p.pair_id for p in build(texts, max_pairs=15, seed=11)[0]] == [p.pair_id for p in pairs]
    other, _ = build(texts, max_pairs=15, seed=12)
    assert {p.pair_id for p in other} != {p.pair_id for p in pairs}
    assert len({p.pair_id for p in pairs}) == 15
    assert len(again) == 15


def test_label_rollout_and_no_gold():
    r = label_rollout(ro(0, "thinking\nFinal answer: 1,234"), "1234")
    assert r.final_answer == "1,234" and r.correct is True
    assert label_rollout(ro(0, "nothing"), "3").correct is False
    assert label_rollout(ro(0, "Final answer: 2"), None).correct is None
    with pytest.raises(ValueError):
        correctness_pairs({**PROMPT, "answer": None}, [], max_pairs=1, round=0, policy_version=0, rng_seed=0)


def test_dedupe_keeps_first_by_sample_index():
    kept, n = dedupe_rollouts([ro(2, "a"), ro(0, "a"), ro(1, "b")])
    assert [r.sample_index for r in kept] == [0, 1] and n == 1


def test_derive_seed_stable_and_bounded():
    assert derive_seed(0, "round", 1, "p") == derive_seed(0, "round", 1, "p")
    assert derive_seed(0, "round", 1, "p") != derive_seed(0, "round", 2, "p")
    assert 0 <= derive_seed("x") < 2**31


# ------------------------------------------------------------------------------------- chosen-side check

# A synthetic 4x4 task, "red and blue in total?" on r...b..r.r.b...g (red at cells 0, 7, 9; blue at 4, 11): gold 5.
CELLS = "r...b..r.r.b...g"
GRID = {"id": "g1", "question": "How many red and blue shapes are there in total?<image>", "images": [b"png"],
        "answer": "5", "kind": "qa", "meta": json.dumps({"op": "sum", "colors": ["red", "blue"], "cells": CELLS})}
WORKED = worked_solution("sum", ["red", "blue"], CELLS)[0]  # right answer, holds together, reads the grid right
# misreads a red cell (2 + 2 = 4), then answers 5 anyway: right by luck, the answer does not follow from the chain
JUMP = "r: 1......2........ = 2\nb: ....1......2.... = 2\n2 + 2 = 4\nFinal answer: 5"
# reads the red cell 7 as blue (2 + 3 = 5): holds together, right answer, but misread the image
MISREAD = worked_solution("sum", ["red", "blue"], "r...b..b.r.b...g")[0]
WRONG = "r: 1......2........ = 2\nb: ....1......2.... = 2\n2 + 2 = 4\nFinal answer: 4"


def checked_pairs(row, texts, mode):
    return correctness_pairs(row, [ro(i, t) for i, t in enumerate(texts)], max_pairs=15, round=1, policy_version=0,
                             rng_seed=0, chosen_ok=chosen_checker(mode, row_meta(row)))


def test_chosen_check_drops_lucky_and_misread_positives():
    texts = [WORKED, JUMP, MISREAD, WRONG]
    chosen = {}
    for mode in ("answer", "consistent", "perceived"):
        pairs, skipped = checked_pairs(GRID, texts, mode)
        assert {p.rejected for p in pairs} == {WRONG} and all(p.chosen_correct for p in pairs)
        chosen[mode] = ([p.chosen for p in pairs], skipped)
    assert chosen["answer"] == ([WORKED, JUMP, MISREAD], Counter())
    assert chosen["consistent"] == ([WORKED, MISREAD], Counter(chosen_check_failed=1))  # the lucky jump
    assert chosen["perceived"] == ([WORKED], Counter(chosen_check_failed=2))  # + the misread chain
    # a dropped positive is not turned into a negative: no pair has it on either side
    assert all(JUMP not in (p.chosen, p.rejected) for p in checked_pairs(GRID, texts, "consistent")[0])


def test_chosen_check_with_no_positive_left_and_all_correct():
    pairs, skipped = checked_pairs(GRID, [JUMP, MISREAD, WRONG], "perceived")
    assert pairs == [] and skipped == Counter(chosen_check_failed=2, no_checked_positive=1)
    pairs, skipped = checked_pairs(GRID, [JUMP, MISREAD, WRONG], "consistent")
    assert [p.chosen for p in pairs] == [MISREAD] and skipped == Counter(chosen_check_failed=1)
    # a prompt with no wrong response is all_correct under every mode; the check is not counted there
    assert checked_pairs(GRID, [WORKED, JUMP], "perceived") == ([], Counter(all_correct=1))
    # any callable will do (pairs.py knows nothing of chains)
    pairs, skipped = correctness_pairs(PROMPT, [ro(0, "Final answer: 3"), ro(1, "so 3\nFinal answer: 3"),
                                                ro(2, "Final answer: 4")], max_pairs=15, round=0, policy_version=0,
                                       rng_seed=0, chosen_ok=lambda text: text.startswith("so"))
    assert [p.chosen for p in pairs] == ["so 3\nFinal answer: 3"] and skipped == Counter(chosen_check_failed=1)


def test_chosen_check_on_a_row_without_grid_is_the_answer_rule():
    for meta in (None, '{"source": "mmpr"}'):
        row = {**GRID, "id": "q1", "meta": meta}
        for mode in ("consistent", "perceived"):
            pairs, skipped = checked_pairs(row, [WORKED, JUMP, MISREAD, WRONG], mode)
            assert [p.chosen for p in pairs] == [WORKED, JUMP, MISREAD] and skipped == Counter()


def test_rft_examples_take_the_chosen_check():
    plain = {"id": "q1", "question": "How many?", "images": [], "answer": "3", "kind": "qa", "meta": None}
    prompts = {"g1": GRID, "q1": plain}

    def row(pid, i, text, correct):
        return {"prompt_id": pid, "text": text, "correct": correct, "source": "rollout", "round": 1,
                "policy_version": 0, "final_answer": None, "token_ids": None, "logprobs": None, "sample_index": i}
    rows = [row("g1", 0, JUMP, True), row("g1", 1, MISREAD, True), row("g1", 2, WORKED, True),
            row("g1", 3, WRONG, False), row("g1", 4, WORKED, True), row("q1", 0, JUMP, True)]

    def chosen(mode, cap=8):
        return [(e.prompt_id, e.chosen) for e in rft_examples(rows, prompts, max_per_prompt=cap, chosen_check=mode)]
    assert chosen("answer") == [("g1", JUMP), ("g1", MISREAD), ("g1", WORKED), ("q1", JUMP)]
    assert chosen("consistent") == [("g1", MISREAD), ("g1", WORKED), ("q1", JUMP)]  # q1 has no grid: answer rule
    assert chosen("perceived") == [("g1", WORKED), ("q1", JUMP)]
    # the cap counts kept examples only: a failing sample does not take a slot
    assert chosen("answer", cap=1) == [("g1", JUMP), ("q1", JUMP)]
    assert chosen("perceived", cap=1) == [("g1", WORKED), ("q1", JUMP)]


def test_rft_examples_repeat_the_prompts_that_also_drew_a_wrong_sample():
    """g1 drew a right chain twice (one distinct text) and a wrong one, q1 only right ones: with mixed_repeats=3,
    g1's example is listed 3 times (after all first copies), q1's once; every copy has its own pair_id."""
    plain = {"id": "q1", "question": "How many?", "images": [], "answer": "3", "kind": "qa", "meta": None}
    prompts = {"g1": GRID, "q1": plain}
    rows = [{"prompt_id": pid, "text": text, "correct": ok, "source": "rollout", "round": 1, "policy_version": 0,
             "final_answer": None, "token_ids": None, "logprobs": None, "sample_index": i}
            for i, (pid, text, ok) in enumerate([("g1", WORKED, True), ("g1", WRONG, False), ("g1", WORKED, True),
                                                 ("q1", JUMP, True)])]
    once = rft_examples(rows, prompts, max_per_prompt=8)
    thrice = rft_examples(rows, prompts, max_per_prompt=8, mixed_repeats=3)
    assert [(e.prompt_id, e.chosen) for e in once] == [("g1", WORKED), ("q1", JUMP)]
    assert [(e.prompt_id, e.chosen) for e in thrice] == [("g1", WORKED), ("q1", JUMP), ("g1", WORKED), ("g1", WORKED)]
    assert len({e.pair_id for e in thrice}) == 4 and thrice[:2] == once


def test_pairs_stage_reads_the_row_meta_select_kept():
    """rollout_pipeline wiring without Ray: _select carries a generated task's meta into the work row, and _pairs
    builds the chosen-side check from it (a correct glance answer has no chain: dropped under "consistent")."""
    from dataclasses import asdict

    import pyarrow as pa

    from mpo_online.data.prompts import rows_to_table
    from mpo_online.rollout.pipeline import WORK_SCHEMA, _pairs, _select
    from mpo_online.synthetic.tasks import generate_tasks

    task = generate_tasks(1, seed=3, levels=(2,), open_fraction=0.0)[0]
    meta = json.loads(task["meta"])
    work = _select(rows_to_table([task]), ids=[task["id"]], cot_instruction="").to_pylist()
    assert len(work) == 1 and work[0]["meta"] == task["meta"] and work[0]["rejects"] is None
    texts = [task["solution"], meta["glance"], f"Final answer: {int(task['answer']) + 1}"]
    rollouts = [label_rollout(ro(i, t), task["answer"]) for i, t in enumerate(texts)]
    assert [r.correct for r in rollouts] == [True, True, False]
    work[0]["rollouts"] = json.dumps([asdict(r) for r in rollouts])
    table = pa.Table.from_pylist(work, schema=WORK_SCHEMA)
    kw = dict(round=1, policy_version=0, seed=0, max_pairs=4, ratio=0.5, dropout_ntp=True, placeholder_ids=[])
    for mode, chosen, skipped in (("answer", [texts[0], texts[1]], {}),
                                  ("consistent", [texts[0]], {"chosen_check_failed": 1})):
        out = _pairs(table, **kw, chosen_check=mode).to_pylist()[0]
        assert [p["chosen"] for p in json.loads(out["pairs"])] == chosen
        assert json.loads(out["skipped"]) == skipped


# ---------------------------------------------------------------------------------------------- Dropout-NTP

def test_ntp_prefix_word_ratio_keeps_spacing():
    assert ntp_prefix("a b c d", 0.5) == "a b"
    assert ntp_prefix("one  two\nthree four five", 0.5) == "one  two"  # int(5 * 0.5) = 2 words, spacing kept
    assert ntp_prefix("  lead x y z", 0.75) == "  lead x y"
    assert ntp_prefix("single", 0.5) == ""
    assert ntp_prefix("", 0.5) == ""
    with pytest.raises(ValueError):
        ntp_prefix("a b", 1.0)


def test_ntp_chosen_filters_truncated_short_and_caps():
    rollouts = [ro(0, "3 red and 2 blue shapes."), ro(1, "3 red and 2 blue shapes."), ro(2, "x"),
                ro(3, "cut off here and", finish="length"), ro(4, "1 green shape."), ro(5, "2 red shapes."),
                ro(6, "ab cd", pieces=["a", "b c", "d"])]  # the word prefix "ab" ends inside the token "b c"
    picked, skipped = ntp_chosen(rollouts, max_pairs=2, ratio=0.5, rng_seed=0)
    assert skipped == Counter(duplicate_response=1, empty_prefix=1, truncated_chosen=1, ntp_no_token_boundary=1,
                              over_cap=1)
    assert len(picked) == 2
    for r, prefix, k in picked:
        assert r.text.startswith(prefix) and prefix == ntp_prefix(r.text, 0.5) and k == len(prefix)  # 1 char/token


def test_prefix_token_count_on_token_boundaries():
    # multi-character tokens, and zero-width (special) tokens around the boundary: the smallest k is taken
    r = ro(0, "3 red and 2 blue", pieces=["", "3 ", "red", "", " and", "", " 2", " blue"])
    assert prefix_token_count(r, "3 red") == 3  # "", "3 ", "red"; the special token after "red" is not kept
    assert prefix_token_count(r, "3 red and") == 5
    assert prefix_token_count(r, "3") is None  # inside the token "3 "
    assert prefix_token_count(r, "4 red") is None  # not a prefix of the text
    no_offsets = Rollout(prompt_id="p1", round=0, policy_version=0, sample_index=0, text="a b", n_tokens=3,
                         finish_reason="stop")
    assert prefix_token_count(no_offsets, "a") is None


def test_ntp_request_is_text_only_and_continues_the_prefix_ids():
    req = ntp_continuation_request("Describe the image.", [5, 6, 7], temperature=1.0, top_p=1.0, max_tokens=32,
                                   seed=5)
    assert req["messages"] == text_only_messages("Describe the image.")
    assert req["assistant_prefix_token_ids"] == [5, 6, 7]
    assert all(p["type"] == "text" for m in req["messages"] for p in m["content"])  # no image travels
    assert (req["n"], req["temperature"], req["top_p"], req["max_tokens"], req["seed"]) == (1, 1.0, 1.0, 32, 5)
    assert req["logprobs"] is True and req["return_prompt_token_ids"] is True


def test_ntp_pair_fields():
    row = {"id": "o1", "question": "Describe the image.", "images": [b"img"], "answer": None, "kind": "open"}
    chosen = ro(0, "3 red and 2 blue shapes.")
    p = ntp_pair(row, chosen, "3 red and", " 4 green.", round=1, policy_version=2, prefix_tokens=9,
                 continuation_token_ids=[1, 2, 3])
    assert p.kind == "dropout_ntp" and p.rejected == "3 red and 4 green." and p.ntp_prefix == "3 red and"
    assert p.chosen == "3 red and 2 blue shapes." and p.images == [b"img"] and p.chosen_correct is None
    assert p.pair_id == PreferencePair.make_id("o1", "dropout_ntp", p.chosen, p.rejected)
    assert p.chosen_token_ids == chosen.token_ids and p.chosen_logprobs == chosen.logprobs
    assert p.rejected_token_ids == chosen.token_ids[:9] + [1, 2, 3]
    assert p.rejected_logprobs is None  # the continuation was sampled without the image: not this prompt's
    assert ntp_pair(row, chosen, "3 red and", " 4 green.", round=1, policy_version=2).rejected_token_ids is None
    assert ntp_pair(row, ro(0, "3 red and 2 blue."), "3 red and", " 2 blue. ", round=0, policy_version=0) is None
    with pytest.raises(ValueError):
        ntp_pair(row, ro(0, "abc"), "xyz", "", round=0, policy_version=0)


def test_pair_table_round_trip_with_and_without_token_columns():
    import pyarrow as pa

    from mpo_online.data.records import TOKEN_COLUMNS, pair_schema, pairs_to_table, table_to_pairs

    row = {"id": "o1", "question": "Describe the image.", "images": [b"img"], "answer": None, "kind": "open"}
    with_ids = ntp_pair(row, ro(0, "3 red and 2 blue."), "3 red", " 4.", round=1, policy_version=2,
                        prefix_tokens=5, continuation_token_ids=[7, 8])
    text_only = build(["Final answer: 3", "Final answer: 4"])[0][0]
    text_only.chosen_token_ids = text_only.chosen_logprobs = None
    text_only.rejected_token_ids = text_only.rejected_logprobs = None
    table = pairs_to_table([with_ids, text_only])
    assert table.schema.equals(pair_schema(), check_metadata=False)
    back = table_to_pairs(table)
    assert back[0].chosen_token_ids == with_ids.chosen_token_ids and back[0].rejected_logprobs is None
    assert back[0].rejected_token_ids == with_ids.rejected_token_ids
    assert back[0].chosen_logprobs == pytest.approx(with_ids.chosen_logprobs, abs=1e-6)  # stored as float32
    assert back[1] == text_only
    # a pairs file written before the token columns existed still loads, with None ids (the text path)
    old = table.drop_columns(list(TOKEN_COLUMNS))
    assert set(TOKEN_COLUMNS).isdisjoint(old.column_names) and isinstance(old, pa.Table)
    legacy = table_to_pairs(old)
    assert legacy[0].chosen == with_ids.chosen and legacy[0].chosen_token_ids is None

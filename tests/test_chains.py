"""Tests for mpo_online.synthetic.chains (render and check the synthetic tasks' chains) and for the image-placement
convention (records.content_parts / prompt_question, data._question_text) the tasks rely on. Pure logic, no Ray."""

from mpo_online.data.prompts import normalize_row
from mpo_online.data.records import (
    PreferencePair,
    openai_messages,
    pair_to_row,
    row_to_pair,
    strip_placeholders,
    user_message,
)
from mpo_online.synthetic.chains import (
    check_chain,
    chosen_checker,
    describe_solution,
    glance_solution,
    row_meta,
    scan_line,
    worked_solution,
)

# Row-major 4x4 grid: r at cells 0, 7, 9; b at 4, 11; g at 15.
CELLS = "r...b..r.r.b...g"


def test_scan_lines_and_worked_solutions_by_hand():
    assert scan_line(CELLS, "r") == ("r: 1......2.3...... = 3", 3)
    assert scan_line(CELLS, "y") == ("y: ................ = 0", 0)
    text, n = worked_solution("sum", ["red", "blue"], CELLS)
    assert (text, n) == ("r: 1......2.3...... = 3\nb: ....1......2.... = 2\n3 + 2 = 5\nFinal answer: 5", 5)
    assert worked_solution("count", ["green"], CELLS) == ("g: ...............1 = 1\nFinal answer: 1", 1)
    assert worked_solution("diff", ["red", "blue"], CELLS)[1] == 1
    assert describe_solution(CELLS, ("red", "yellow")) == "r: 1......2.3...... = 3\ny: ................ = 0"
    assert glance_solution("product", ["red", "blue"], {"red": 3, "blue": 2}) == \
        "I see 3 red and 2 blue. 3 * 2 = 6.\nFinal answer: 6"
    # Level 4: one colour's count times the question's factor.
    assert worked_solution("scale", ["red"], CELLS, 7) == ("r: 1......2.3...... = 3\n3 * 7 = 21\nFinal answer: 21", 21)
    assert glance_solution("scale", ["red"], {"red": 3}, 7) == "I see 3 red. 3 * 7 = 21.\nFinal answer: 21"


def test_check_chain_of_the_scale_op_checks_the_times_table_fact_and_the_factor():
    right = "r: 1......2.3...... = 3\n3 * 7 = 21\nFinal answer: 21"
    assert check_chain(right, "scale", ["red"], CELLS, 7) == {"scanned": True, "consistent": True, "perceived": True}
    # A wrong fact (3 * 7 = 24), the wrong factor (3 * 6 = 18) or a misread count carried through (2 * 7 = 14).
    assert not check_chain(right.replace("21", "24"), "scale", ["red"], CELLS, 7)["consistent"]
    assert not check_chain("r: 1......2.3...... = 3\n3 * 6 = 18\nFinal answer: 18", "scale", ["red"], CELLS,
                           7)["consistent"]
    assert check_chain("r: 1......2........ = 2\n2 * 7 = 14\nFinal answer: 14", "scale", ["red"], CELLS, 7) == \
        {"scanned": True, "consistent": True, "perceived": False}


def test_check_chain_tells_consistent_misread_and_broken_chains_apart():
    right, _ = worked_solution("sum", ["red", "blue"], CELLS)
    assert check_chain(right, "sum", ["red", "blue"], CELLS) == {"scanned": True, "consistent": True,
                                                                 "perceived": True}
    # Misread one red cell, but every later step follows the chain: consistent, not perceived (answer 4, gold 5).
    misread = "r: 1......2........ = 2\nb: ....1......2.... = 2\n2 + 2 = 4\nFinal answer: 4"
    assert check_chain(misread, "sum", ["red", "blue"], CELLS) == {"scanned": True, "consistent": True,
                                                                   "perceived": False}
    # The answer does not follow from the stated counts ("3 + 2 = 5" but final 4): not consistent.
    jump = right.replace("Final answer: 5", "Final answer: 4")
    assert check_chain(jump, "sum", ["red", "blue"], CELLS)["consistent"] is False
    # A line whose count is not its last tally, and tallies that skip a number.
    assert not check_chain("r: 1......2.3...... = 2\nFinal answer: 2", "count", ["red"], CELLS)["consistent"]
    assert not check_chain("r: 1......2.4...... = 4\nFinal answer: 4", "count", ["red"], CELLS)["consistent"]
    # Glance chains, wrong colour order, truncated output and junk are not scanned chains.
    for text in (glance_solution("sum", ["red", "blue"], {"red": 3, "blue": 2}),
                 "b: ....1......2.... = 2\nr: 1......2.3...... = 3\n2 + 3 = 5\nFinal answer: 5",
                 right[:30], "", "r: 1 = 1\n" * 50):
        assert check_chain(text, "sum", ["red", "blue"], CELLS) == {"scanned": False, "consistent": False,
                                                                    "perceived": False}


def test_image_placeholder_layout_round_trips():
    # Default layout (no placeholder): images first, as before; a trailing placeholder puts the image after the text.
    assert user_message("Q?", 1)[0]["content"] == [{"type": "image", "text": None}, {"type": "text", "text": "Q?"}]
    assert user_message("Q?<image>", 1)[0]["content"] == [{"type": "text", "text": "Q?"},
                                                          {"type": "image", "text": None}]
    parts = openai_messages("Q?<image> Answer directly.", [b"\x89PNG"])[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text"]
    assert openai_messages("Q?<image>", [b"\x89PNG"], with_images=False)[0]["content"] == [{"type": "text",
                                                                                             "text": "Q?"}]
    assert strip_placeholders("A<image>B") == "AB"
    for q, n in (("Q?<image>", 1), ("Q?", 1), ("<image>A<image>B", 2), ("No image", 0)):
        pair = PreferencePair(pair_id="p", prompt_id="q", kind="sft", question=q, images=[b"x"] * n, chosen="c",
                              rejected=None)
        assert row_to_pair(pair_to_row(pair)).question == q


def test_prompt_rows_keep_placeholders_that_place_images():
    img = {"bytes": b"\x89PNG"}
    assert normalize_row({"question": "<image>\nWhat?", "images": [img]})["question"] == "What?"  # MMPR: image first
    assert normalize_row({"question": "What?<image>", "images": [img]})["question"] == "What?<image>"
    assert normalize_row({"question": "What?<image>", "images": []})["question"] == "What?"  # no image: dropped
    assert normalize_row({"question": "A<image>B<image>", "images": [img]})["question"] == "AB"  # count mismatch


def test_warm_start_mixes_glance_demos_with_image_free_worked_drills():
    """4 tasks: the first 2 become image demonstrations (all glance style at glance_fraction 1.0 when they ask a
    question, CoT since direct_fraction is 0), the next 2 text drills: worked chains, no image, no placeholder."""
    import json

    from mpo_online.synthetic.tasks import generate_tasks
    from mpo_online.warm_start import warm_start_data

    rows = generate_tasks(4, seed=11, levels=(1, 2), open_fraction=0.0)
    data = warm_start_data(rows, examples=2, text_drills=2, cot_instruction=" Think.", direct_instruction=" Now.",
                           direct_fraction=0.0, glance_fraction=1.0, seed=0)
    assert [d.prompt_id for d in data] == [r["id"] for r in rows]
    for d, r in zip(data[:2], rows[:2]):
        assert d.chosen == json.loads(r["meta"])["glance"] and d.images == r["images"]
        assert d.question == r["question"] + " Think."
    for d, r in zip(data[2:], rows[2:]):
        assert d.chosen == r["solution"] and d.images == [] and "<image>" not in d.question


def test_warm_start_stage2_takes_the_drill_rows_with_their_images():
    """6 tasks, stage 1 uses the first 2 with images (and 2 drills); stage 2 of 3 examples takes rows 3-5 (the
    rows after stage 1's image examples), now with their images and worked chains; 5 examples do not fit: error."""
    import pytest

    from mpo_online.synthetic.tasks import generate_tasks
    from mpo_online.warm_start import stage2_data

    rows = generate_tasks(6, seed=12, levels=(1, 2), open_fraction=0.0)
    kw = dict(cot_instruction=" Think.", direct_instruction=" Now.", direct_fraction=0.0, glance_fraction=0.0,
              seed=0)
    data = stage2_data(rows, examples=2, count=3, **kw)
    assert [d.prompt_id for d in data] == [r["id"] for r in rows[2:5]]
    for d, r in zip(data, rows[2:5]):
        assert d.chosen == r["solution"] and d.images == r["images"] and d.question == r["question"] + " Think."
    with pytest.raises(ValueError, match="stage2_examples=5"):
        stage2_data(rows, examples=2, count=5, **kw)
    # with 2 drills: rows 3-5 with their images, then rows 1-2 (stage 1's image examples) without them
    data = stage2_data(rows, examples=2, count=3, text_drills=2, **kw)
    assert [d.prompt_id for d in data] == [r["id"] for r in rows[2:5] + rows[:2]]
    for d, r in zip(data[3:], rows[:2]):
        assert d.chosen == r["solution"] and d.images == [] and "<image>" not in d.question
    with pytest.raises(ValueError, match="stage2_text_drills=3"):
        stage2_data(rows, examples=2, count=3, text_drills=3, **kw)


def test_pair_chain_rates_by_hand():
    """Two correctness pairs on CELLS ("How many red and blue in total?", gold 5) and one Dropout-NTP pair (ignored).
    Pair 1: chosen = the worked solution (scanned, consistent, perceived); rejected = a glance guess "4" (no scan
    lines: not scanned, not consistent, not perceived). Pair 2: chosen = a glance "5" (right by luck: not scanned);
    rejected = a misread but consistent chain (scanned, consistent, not perceived). So chosen: scanned 1/2,
    perceived 1/2, consistent 1/2; rejected: scanned 1/2, perceived 0, consistent 1/2."""
    from mpo_online.synthetic.chains import pair_chain_rates

    worked, _ = worked_solution("sum", ["red", "blue"], CELLS)
    misread = "r: 1......2........ = 2\nb: ....1......2.... = 2\n2 + 2 = 4\nFinal answer: 4"
    glance = glance_solution("sum", ["red", "blue"], {"red": 2, "blue": 2})
    lucky = glance_solution("sum", ["red", "blue"], {"red": 3, "blue": 2})
    meta = {"t": {"op": "sum", "colors": ["red", "blue"], "cells": CELLS}}

    def pair(kind, chosen, rejected):
        return {"prompt_id": "t", "kind": kind, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    rates = pair_chain_rates([pair("correctness", worked, glance), pair("correctness", lucky, misread),
                              pair("dropout_ntp", worked, misread)], meta)
    assert rates == {"pairs_checked": 2, "chosen_scanned": 0.5, "chosen_perceived": 0.5, "chosen_consistent": 0.5,
                     "rejected_scanned": 0.5, "rejected_perceived": 0.0, "rejected_consistent": 0.5}
    assert pair_chain_rates([pair("dropout_ntp", worked, misread)], meta) == {}


def test_chosen_checker_modes_by_hand():
    """On CELLS, "red and blue in total?" (gold 5): the worked chain passes every check; a chain that misreads a red
    cell and then jumps to the gold answer (computes 2 + 2 = 4, answers 5) is right by luck: not consistent; a chain
    that reads a red cell as blue (2 + 3 = 5) holds together but misread the image: consistent, not perceived."""
    import json

    import pytest

    worked, _ = worked_solution("sum", ["red", "blue"], CELLS)
    jump = "r: 1......2........ = 2\nb: ....1......2.... = 2\n2 + 2 = 4\nFinal answer: 5"
    misread, n = worked_solution("sum", ["red", "blue"], "r...b..b.r.b...g")  # cell 7: red read as blue
    assert n == 5 and misread == "r: 1........2...... = 2\nb: ....1..2...3.... = 3\n2 + 3 = 5\nFinal answer: 5"
    meta = {"op": "sum", "colors": ["red", "blue"], "cells": CELLS}
    consistent, perceived = chosen_checker("consistent", meta), chosen_checker("perceived", meta)
    assert [consistent(t) for t in (worked, jump, misread)] == [True, False, True]
    assert [perceived(t) for t in (worked, jump, misread)] == [True, False, False]
    lucky_glance = glance_solution("sum", ["red", "blue"], {"red": 3, "blue": 2})  # no scan: nothing to hold together
    assert consistent(lucky_glance) is False and perceived(lucky_glance) is False
    # "answer", or a row that is not a synthetic grid task: no check (the paper's rule)
    assert chosen_checker("answer", meta) is None
    assert chosen_checker("perceived", None) is None and chosen_checker("consistent", {"source": "mmpr"}) is None
    with pytest.raises(ValueError, match="chosen check"):
        chosen_checker("luck", meta)
    # row_meta: parsed meta of synthetic rows only
    assert row_meta({"id": "t", "meta": json.dumps(meta)}) == meta
    assert row_meta({"id": "q", "meta": '{"source": "mmpr"}'}) is None and row_meta({"id": "q", "meta": None}) is None

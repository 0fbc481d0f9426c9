"""Tests for mpo_online.synthetic.tasks: rendering, determinism, answers checked against the image pixels, CoT format,
difficulty knobs, the open family, the image-blind bound vs an image-reading oracle, and the on-disk splits.

The answer check is independent of the generator: it reads each cell's centre pixel from the PNG, classifies it by
its RGB channels, parses the question text with its own regexes and recomputes the answer.
"""

import io
import json
import random
import re
from collections import Counter

import pyarrow.parquet as pq
import pytest
from PIL import Image

from mpo_online.data.prompts import PROMPT_SCHEMA, load_prompts, validate_row
from mpo_online.synthetic.tasks import blind_accuracy_bound, generate_tasks, render_grid, write_task_splits

CELL = 16


def _classify(rgb) -> str | None:
    """Colour name of a pixel from its channels alone (no palette import): None for white background."""
    r, g, b = rgb
    if r > 200 and g > 200 and b > 200:
        return None
    if r > 150 and g > 150 and b < 100:
        return "yellow"
    if r > 150 and g < 100 and b < 100:
        return "red"
    if g > 120 and r < 100 and b < 100:
        return "green"
    if b > 150 and r < 100 and g < 100:
        return "blue"
    raise AssertionError(f"unexpected pixel colour {rgb}")


def pixel_cells(png: bytes, grid: int = 4) -> list:
    """Each cell's colour name (None = empty), row-major, read off the centre pixels."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.size == (grid * CELL, grid * CELL)
    return [_classify(img.getpixel((c * CELL + CELL // 2, r * CELL + CELL // 2))) for r in range(grid)
            for c in range(grid)]


def pixel_counts(png: bytes, grid: int = 4) -> Counter:
    return Counter(name for name in pixel_cells(png, grid) if name)


def expected_line(cells: list, color: str) -> str:
    """The scan line of one colour, rebuilt from the pixels: '.' or the running count, one char per cell."""
    out, k = [], 0
    for name in cells:
        k += name == color
        out.append(str(k) if name == color else ".")
    return f"{color[0]}: {''.join(out)} = {k}"


def oracle_answer(question: str, counts: Counter) -> str | None:
    """Answer a question from counts read off the image, by parsing the question text."""
    question = question.removesuffix("<image>")  # the image follows the question
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(counts[m[1]])
    if m := re.fullmatch(r"How many (\w+) and (\w+) shapes are there in total\?", question):
        return str(counts[m[1]] + counts[m[2]])
    if m := re.fullmatch(r"How many more (\w+) shapes than (\w+) shapes are there\?", question):
        return str(counts[m[1]] - counts[m[2]])
    if m := re.fullmatch(r"Multiply the number of (\w+) shapes by the number of (\w+) shapes\.", question):
        return str(counts[m[1]] * counts[m[2]])
    if m := re.fullmatch(r"Multiply the number of (\w+) shapes by (\d)\.", question):
        return str(counts[m[1]] * int(m[2]))
    return None


def pixel_counts_of(img, row):
    return [_classify(img.getpixel((c * CELL + 8, row * CELL + 8))) for c in range(img.size[0] // CELL)]


def test_render_grid_colours_and_fill():
    cells = [[("red", "square"), ("green", "circle"), ("blue", "triangle"), ("yellow", "square")],
             [None, None, None, None]]
    img = render_grid(cells)
    assert img.size == (64, 32) and img.mode == "RGB"
    assert pixel_counts_of(img, row=0) == ["red", "green", "blue", "yellow"]
    assert pixel_counts_of(img, row=1) == [None] * 4
    # Each shape dominates its 16-px patch (what one vision patch of the tiny model sees).
    min_fill = {"square": 0.7, "circle": 0.55, "triangle": 0.3}
    for c, (color, shape) in enumerate(cells[0]):
        patch = img.crop((c * CELL, 0, (c + 1) * CELL, CELL))
        px = [_classify(patch.getpixel((x, y))) for y in range(CELL) for x in range(CELL)]
        assert set(px) == {color, None}  # no anti-aliased in-between colours
        assert px.count(color) / len(px) >= min_fill[shape], (shape, px.count(color))


def test_render_grid_rejects_unknown_cells():
    with pytest.raises(ValueError):
        render_grid([[("purple", "square")]])


def test_deterministic_and_seed_sensitive_without_global_rng():
    random.seed(123)
    state = random.getstate()
    a = generate_tasks(40, seed=7)
    assert random.getstate() == state  # the global RNG is neither used nor advanced
    random.seed(999)
    b = generate_tasks(40, seed=7)
    assert a == b
    c = generate_tasks(40, seed=8)
    assert [r["images"] for r in a] != [r["images"] for r in c]
    assert len({r["id"] for r in a}) == 40
    assert generate_tasks(10, seed=7) == a[:10]  # a prefix of the same stream


def test_answers_match_the_pixels_and_solutions_end_in_final_answer():
    rows = generate_tasks(400, seed=1)
    for r in rows:
        assert set(r) == set(PROMPT_SCHEMA.names)
        assert validate_row(r) is None
        counts = pixel_counts(r["images"][0])
        meta = json.loads(r["meta"])
        assert {k: v for k, v in meta["counts"].items() if v} == dict(counts)
        if r["kind"] == "qa":
            assert r["answer"] == oracle_answer(r["question"], counts), r
            assert int(r["answer"]) >= 0
            lines = r["solution"].split("\n")
            assert lines[-1] == f"Final answer: {r['answer']}"
            cells = pixel_cells(r["images"][0])
            assert lines[:len(meta["colors"])] == [expected_line(cells, c) for c in meta["colors"]]
            if len(meta["colors"]) == 2:  # the arithmetic line reads the two stated counts
                x, y = (counts[c] for c in meta["colors"])
                assert re.fullmatch(rf"{x} [-+*] {y} = {r['answer']}", lines[2]), lines
            assert len(lines) == 2 * len(meta["colors"]) and len(r["solution"]) < 90  # short: char-level tokens
            first = meta["glance"].split("\n")[0]
            assert first.startswith("I see ") and all(f"{counts[c]} {c}" in first for c in meta["colors"])
        else:
            assert r["answer"] is None and r["question"] == "Describe the image.<image>" and meta["level"] is None
            assert "Final answer" not in r["solution"]
            cells = pixel_cells(r["images"][0])
            assert r["solution"].split("\n") == [expected_line(cells, c) for c in ("red", "green", "blue", "yellow")]


def test_counts_are_uniform_per_colour():
    rows = generate_tasks(3000, seed=2, open_fraction=0.0)
    freq = Counter(json.loads(r["meta"])["counts"]["red"] for r in rows)
    assert set(freq) == set(range(6))
    for value in range(6):  # 1/6 each, slightly tilted toward small counts by the fits-in-grid condition
        assert 0.12 < freq[value] / len(rows) < 0.22, freq


def test_difficulty_knobs_change_questions():
    lv1 = generate_tasks(200, seed=3, levels=(1,), open_fraction=0.0)
    assert all(re.fullmatch(r"How many \w+ shapes are there\?<image>", r["question"]) for r in lv1)
    lv2 = generate_tasks(200, seed=3, levels=(2,), open_fraction=0.0)
    ops = Counter(json.loads(r["meta"])["op"] for r in lv2)
    assert set(ops) == {"sum", "diff"} and min(ops.values()) > 50
    assert all(int(r["answer"]) >= 0 for r in lv2)
    assert any(" - " in r["solution"] for r in lv2) and any(" + " in r["solution"] for r in lv2)
    lv3 = generate_tasks(200, seed=3, levels=(3,), open_fraction=0.0)
    assert all(r["question"].startswith("Multiply the number of") for r in lv3)
    assert {json.loads(r["meta"])["level"] for r in lv3} == {3}
    mixed = generate_tasks(300, seed=3)
    assert {json.loads(r["meta"])["level"] for r in mixed} == {1, 2, 3, None}
    small = generate_tasks(50, seed=3, grid=2, colors=("red", "blue"), max_count=3)
    for r in small:
        assert sum(json.loads(r["meta"])["counts"].values()) <= 4
        assert Image.open(io.BytesIO(r["images"][0])).size == (32, 32)
    lv4 = generate_tasks(200, seed=3, levels=(4,), open_fraction=0.0)
    metas = [json.loads(r["meta"]) for r in lv4]
    assert {m["op"] for m in metas} == {"scale"} and {m["factor"] for m in metas} == set(range(2, 10))
    assert all(m["counts"][m["colors"][0]] > 0 for m in metas)  # a present colour: "0" is no blind guess
    for r, m in zip(lv4, metas):  # scan line, "<count> * <factor> = <answer>", final answer
        count = m["counts"][m["colors"][0]]
        assert r["solution"].split("\n")[1:] == [f"{count} * {m['factor']} = {r['answer']}",
                                                 f"Final answer: {r['answer']}"]
    assert "factor" not in json.loads(lv3[0]["meta"])  # the other levels' rows are unchanged
    assert oracle_answer(lv4[0]["question"], pixel_counts(lv4[0]["images"][0])) == lv4[0]["answer"]
    with pytest.raises(ValueError):
        generate_tasks(1, seed=0, levels=(5,))
    with pytest.raises(ValueError):
        generate_tasks(1, seed=0, colors=("red",), levels=(2,))


def test_open_family():
    rows = generate_tasks(1000, seed=4)
    opens = [r for r in rows if r["kind"] == "open"]
    assert 0.11 < len(opens) / len(rows) < 0.19  # open_fraction=0.15
    assert all(r["answer"] is None and r["solution"].startswith("r: ") for r in opens)
    assert all(r["kind"] == "qa" and r["answer"] is not None for r in rows if r not in opens)
    assert not [r for r in generate_tasks(100, seed=4, open_fraction=0.0) if r["kind"] == "open"]
    assert all(r["kind"] == "open" for r in generate_tasks(20, seed=4, open_fraction=1.0))


def test_blind_bound_near_chance_while_image_oracle_is_perfect():
    train = generate_tasks(2500, seed=5)
    evals = generate_tasks(600, seed=6)
    blind = blind_accuracy_bound(train, evals)
    assert blind <= 0.25, blind
    qa = [r for r in evals if r["answer"] is not None]
    oracle = sum(oracle_answer(r["question"], pixel_counts(r["images"][0])) == r["answer"] for r in qa) / len(qa)
    assert oracle == 1.0
    # The bound is a real fit, not a constant: on its own training data it beats the held-out figure.
    assert blind_accuracy_bound(train, train) > blind


def test_write_task_splits_is_byte_identical_and_disjoint(tmp_path):
    info = write_task_splits(tmp_path / "a", n_train=120, n_heldout=40, seed=11, levels=(1, 2))
    write_task_splits(tmp_path / "b", n_train=120, n_heldout=40, seed=11, levels=(1, 2))
    write_task_splits(tmp_path / "c", n_train=120, n_heldout=40, seed=12, levels=(1, 2))
    for name in ("train.parquet", "heldout.parquet", "tasks.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "train.parquet").read_bytes() != (tmp_path / "c" / "train.parquet").read_bytes()

    train = pq.read_table(tmp_path / "a" / "train.parquet")
    heldout = pq.read_table(tmp_path / "a" / "heldout.parquet")
    assert train.schema.equals(PROMPT_SCHEMA) and heldout.schema.equals(PROMPT_SCHEMA)
    assert (train.num_rows, heldout.num_rows) == (120, 40)
    tr_rows, ho_rows = train.to_pylist(), heldout.to_pylist()
    assert not {r["id"] for r in tr_rows} & {r["id"] for r in ho_rows}
    assert not {(r["question"], r["images"][0]) for r in tr_rows} & {(r["question"], r["images"][0]) for r in ho_rows}
    assert {json.loads(r["meta"])["level"] for r in tr_rows} <= {1, 2, None}

    on_disk = json.loads((tmp_path / "a" / "tasks.json").read_text())
    assert on_disk == info
    assert info["params"]["seed"] == 11 and info["params"]["levels"] == [1, 2]
    assert info["params"]["heldout_seed"] != 11
    assert info["splits"]["train"]["n"] == 120
    assert info["splits"]["train"]["by_kind"] == dict(Counter(r["kind"] for r in tr_rows))
    assert 0.0 <= info["blind_accuracy_bound"] <= 1.0

    # The splits read back through the user-data reader with nothing quarantined.
    rows, report = load_prompts(tmp_path / "a" / "train.parquet", quarantine_path=tmp_path / "q.jsonl")
    assert report.n_valid == 120 and report.n_quarantined == 0
    assert rows == tr_rows


def test_ensure_tasks_reuses_matching_dir_and_refuses_a_stale_one(tmp_path):
    """A task dir written with other parameters (e.g. an older n_train) is refused with the differing keys named,
    instead of being silently reused; the same parameters reuse the files untouched."""
    from mpo_online.warm_start import ensure_tasks

    kw = dict(generate_if_missing=True, n_train=40, n_heldout=8, seed=3, levels=[1, 2], max_count=5,
              open_fraction=0.15)
    d = ensure_tasks(str(tmp_path / "t"), **kw)
    before = (d / "train.parquet").read_bytes()
    assert ensure_tasks(str(d), **kw) == d and (d / "train.parquet").read_bytes() == before
    with pytest.raises(ValueError, match=r"n_train.*\(40, 80\)"):
        ensure_tasks(str(d), **{**kw, "n_train": 80})
    with pytest.raises(ValueError, match="levels"):
        ensure_tasks(str(d), **{**kw, "levels": [1]})

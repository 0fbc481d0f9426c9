"""Deterministic synthetic visual-reasoning tasks: count coloured shapes in a grid image, then add/subtract/multiply.

Each task is one 64x64 image (a 4x4 grid of 16 px cells, one shape per cell at most, so each vision patch of the
tiny default policy sees one cell) and a short question whose answer needs the image:

    level 1  "How many red shapes are there?<image>"                                  -> count
    level 2  "How many red and blue shapes are there in total?<image>"                -> sum
             "How many more red shapes than blue shapes are there?<image>"            -> difference (never negative)
    level 3  "Multiply the number of red shapes by the number of green shapes.<image>" -> product
    level 4  "Multiply the number of red shapes by 7.<image>"                          -> scale (factor 2..9)
    open     "Describe the image.<image>"  (no ground truth; answer None, kind "open")

The `<image>` placeholder puts the image after the question (mpo_online.data.records.content_parts), right before the
response: see mpo_online.synthetic.chains for why.

Each colour's count is drawn uniformly from 0..max_count (redrawn until the shapes fit the grid), so the question
alone says little about the answer: `blind_accuracy_bound` measures how little. Every task carries a worked chain of
thought (`solution`: scan-and-tally lines ending in "Final answer: <n>", mpo_online.synthetic.chains) for warm-start
SFT; open tasks carry a description in the same line format. `meta` holds the level, op, asked colours, counts, the grid
as a row-major cell string (`cells`, one letter or "." per cell) and a glance-style chain (`glance`).
Rows are in `mpo_online.data.prompts.PROMPT_SCHEMA`, the schema users bring their own prompts in.

Launched by the jobs/CLI through `write_task_splits(out_dir, n_train, n_heldout, seed)`, or directly:
    python -m mpo_online.synthetic.tasks --out DIR --n-train 2000 --n-heldout 200 --seed 0
"""

from __future__ import annotations

import hashlib
import inspect
import io
import itertools
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from mpo_online.data.records import IMAGE_PLACEHOLDER
from mpo_online.synthetic.chains import COLOR_LETTERS, describe_solution, glance_solution, worked_solution

# 2: image after the question, scan-and-tally chains (mpo_online.synthetic.chains); 1: glance chains, image first
FORMAT = 2

# Far apart in RGB so one sampled pixel (or one 16 px patch) tells the colours apart.
COLORS = {"red": (220, 20, 20), "green": (20, 170, 20), "blue": (20, 40, 220), "yellow": (240, 200, 0)}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (255, 255, 255)
OPEN_QUESTION = "Describe the image."


def render_grid(cells: list[list[tuple[str, str] | None]], cell_px: int = 16):
    """Draw a grid (list of rows; each cell None or (color, shape)) as an RGB PIL image on white.

    Shapes are filled and nearly fill their cell (1 px margin per 16 px) so a patch is dominated by its colour; no
    anti-aliasing, so pixels are exactly the palette colours. Every shape covers its cell's centre pixel.
    """
    from PIL import Image, ImageDraw

    rows, cols = len(cells), max((len(r) for r in cells), default=0)
    img = Image.new("RGB", (cols * cell_px, rows * cell_px), BACKGROUND)
    draw = ImageDraw.Draw(img)
    m = max(1, cell_px // 16)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            color, shape = cell
            if color not in COLORS or shape not in SHAPES:
                raise ValueError(f"unknown cell {cell!r}; colours {list(COLORS)}, shapes {SHAPES}")
            x0, y0 = c * cell_px + m, r * cell_px + m
            x1, y1 = (c + 1) * cell_px - 1 - m, (r + 1) * cell_px - 1 - m
            fill = COLORS[color]
            if shape == "square":
                draw.rectangle([x0, y0, x1, y1], fill=fill)
            elif shape == "circle":
                draw.ellipse([x0, y0, x1, y1], fill=fill)
            else:
                draw.polygon([(x0, y1), ((x0 + x1) / 2, y0), (x1, y1)], fill=fill)
    return img


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # PIL writes no timestamp chunk: same pixels -> same bytes
    return buf.getvalue()


def describe(counts: dict[str, int], colors: tuple[str, ...]) -> str:
    """"3 red, 2 blue and 1 green shapes." (colours in palette order, zeros left out)."""
    parts = [f"{counts[c]} {c}" for c in colors if counts[c] > 0]
    if not parts:
        return "No shapes."
    noun = "shape" if sum(counts.values()) == 1 else "shapes"
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} {noun}."


def _question(rng: random.Random, level: int, counts: dict[str, int], colors: tuple[str, ...]):
    """-> (op, asked colours, question text without the image placeholder, factor (level 4) or None)."""
    if level == 4:  # one colour read from the image (as level 1), then a times table fact the chain writes out
        present = [c for c in colors if counts[c] > 0]  # as level 3: a zero count would make "0" a blind guess
        a, k = rng.choice(present or list(colors)), rng.randint(2, 9)
        return "scale", [a], f"Multiply the number of {a} shapes by {k}.", k
    if level == 1:
        a = rng.choice(colors)
        return "count", [a], f"How many {a} shapes are there?", None
    if level == 2:
        op = rng.choice(("sum", "diff"))
        a, b = rng.sample(colors, 2)
        if op == "diff" and counts[a] < counts[b]:
            a, b = b, a  # ask for the larger minus the smaller: answers stay non-negative integers
        if op == "sum":
            return op, [a, b], f"How many {a} and {b} shapes are there in total?", None
        return op, [a, b], f"How many more {a} shapes than {b} shapes are there?", None
    # Prefer colours that are present: with a zero factor a third of the time, "0" would be a strong blind guess.
    present = [c for c in colors if counts[c] > 0]
    a, b = rng.sample(present if len(present) >= 2 else list(colors), 2)
    return "product", [a, b], f"Multiply the number of {a} shapes by the number of {b} shapes.", None


def _check_args(grid, colors, max_count, levels, open_fraction):
    unknown = [c for c in colors if c not in COLORS]
    if unknown or len(set(colors)) != len(colors) or not colors:
        raise ValueError(f"colors must be distinct names from {list(COLORS)}, got {colors}")
    if not levels or any(lv not in (1, 2, 3, 4) for lv in levels):
        raise ValueError(f"levels must be a non-empty subset of (1, 2, 3, 4), got {levels}")
    if len(colors) < 2 and any(lv in (2, 3) for lv in levels):
        raise ValueError("levels 2 and 3 ask about two colours: give at least two")
    if grid < 1 or max_count < 0 or not 0.0 <= open_fraction <= 1.0:
        raise ValueError(f"need grid >= 1, max_count >= 0, 0 <= open_fraction <= 1 (got {grid}, {max_count}, "
                         f"{open_fraction})")


def iter_tasks(seed: int, *, grid: int = 4, colors: tuple[str, ...] = ("red", "green", "blue", "yellow"),
               max_count: int = 5, levels: tuple[int, ...] = (1, 2, 3), open_fraction: float = 0.15,
               id_prefix: str = "task", cell_px: int = 16) -> Iterator[dict]:
    """The endless task stream behind `generate_tasks` (same arguments); task i has id f"{id_prefix}-{seed}-{i:06d}"."""
    colors, levels = tuple(colors), tuple(levels)
    _check_args(grid, colors, max_count, levels, open_fraction)
    rng = random.Random(seed)  # private RNG: nothing else in the process can perturb the sequence
    n_cells = grid * grid
    for i in itertools.count():
        while True:  # uniform per colour, conditioned on fitting the grid (rarely rejects: P(sum > 16) ~ 3%)
            counts = {c: rng.randint(0, max_count) for c in colors}
            if sum(counts.values()) <= n_cells:
                break
        where = rng.sample(range(n_cells), sum(counts.values()))
        cells: list[list] = [[None] * grid for _ in range(grid)]
        slots = iter(where)
        for c in colors:
            for _ in range(counts[c]):
                pos = next(slots)
                cells[pos // grid][pos % grid] = (c, rng.choice(SHAPES))
        png = _png(render_grid(cells, cell_px))
        scan = "".join("." if c is None else COLOR_LETTERS[c[0]] for row in cells for c in row)  # row-major
        if rng.random() < open_fraction:
            level, op, asked, question, answer = None, "describe", [], OPEN_QUESTION, None
            solution, glance = describe_solution(scan, colors), describe(counts, colors)
        else:
            level = rng.choice(levels)
            op, asked, question, factor = _question(rng, level, counts, colors)
            solution, n = worked_solution(op, asked, scan, factor)
            answer, glance = str(n), glance_solution(op, asked, counts, factor)
        # The image follows the question: the chain's scan lines then sit at a fixed distance from the image tokens.
        question += IMAGE_PLACEHOLDER
        meta = {"level": level, "op": op, "colors": asked, "counts": counts, "grid": grid, "cells": scan,
                "glance": glance}
        if op == "scale":  # only level 4 carries it: the other levels' task files stay byte-identical
            meta["factor"] = factor
        yield {"id": f"{id_prefix}-{seed}-{i:06d}", "question": question, "images": [png], "answer": answer,
               "kind": "open" if answer is None else "qa", "solution": solution,
               "meta": json.dumps(meta, sort_keys=True)}


def generate_tasks(n: int, seed: int, *, grid: int = 4, colors: tuple[str, ...] = ("red", "green", "blue", "yellow"),
                   max_count: int = 5, levels: tuple[int, ...] = (1, 2, 3), open_fraction: float = 0.15,
                   id_prefix: str = "task", cell_px: int = 16) -> list[dict]:
    """`n` tasks as PROMPT_SCHEMA rows (+ solution, meta). Deterministic in all arguments; no global RNG is touched.

    `levels` is the difficulty knob (1 count, 2 sum/difference, 3 product, 4 count times a factor; each task picks one
    uniformly);
    `open_fraction` of tasks are the no-ground-truth "Describe the image." family.
    """
    return list(itertools.islice(iter_tasks(seed, grid=grid, colors=colors, max_count=max_count, levels=levels,
                                            open_fraction=open_fraction, id_prefix=id_prefix, cell_px=cell_px), n))


def _mode(counter: Counter) -> str:
    return min(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0]  # ties -> smallest string: deterministic


def blind_accuracy_bound(train_rows: list[dict], eval_rows: list[dict]) -> float:
    """Accuracy on eval_rows' ground-truth tasks of the best image-blind predictor fitted on train_rows.

    The predictor answers each question text with its most frequent training answer (the global mode for unseen
    texts): the Bayes-optimal guess without the image, up to sampling noise. Rows without an answer are ignored.
    """
    train = [r for r in train_rows if r.get("answer") is not None]
    evals = [r for r in eval_rows if r.get("answer") is not None]
    if not train or not evals:
        raise ValueError("need ground-truth rows in both train_rows and eval_rows")
    by_q: dict[str, Counter] = {}
    for r in train:
        by_q.setdefault(r["question"], Counter())[r["answer"]] += 1
    fallback = _mode(Counter(r["answer"] for r in train))
    guess = {q: _mode(c) for q, c in by_q.items()}
    return sum(guess.get(r["question"], fallback) == r["answer"] for r in evals) / len(evals)


def derive_seed(seed: int, purpose: str) -> int:
    """A seed for a named sub-stream (e.g. the held-out split), stable across Python versions and processes."""
    return int.from_bytes(hashlib.sha256(f"mpo-online:{purpose}:{seed}".encode()).digest()[:4], "big")


def _split_stats(rows: list[dict]) -> dict:
    metas = [json.loads(r["meta"]) for r in rows]
    return {"n": len(rows), "by_kind": dict(sorted(Counter(r["kind"] for r in rows).items())),
            "by_op": dict(sorted(Counter(m["op"] for m in metas).items())),
            "by_level": dict(sorted(Counter(str(m["level"] or "open") for m in metas).items()))}


def write_task_splits(out_dir: str | Path, n_train: int, n_heldout: int, seed: int, **gen_kwargs) -> dict:
    """Write train.parquet, heldout.parquet (PROMPT_SCHEMA) and tasks.json to `out_dir`; return tasks.json's content.

    Held-out tasks come from a derived seed with their own id prefix (ids cannot collide) and any held-out task whose
    (question, image) also occurs in train is skipped, so evaluation never sees a training item. Same arguments ->
    byte-identical files. `gen_kwargs` go to `generate_tasks` (grid, colors, max_count, levels, open_fraction).
    """
    from mpo_online.data.prompts import write_prompts_parquet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen_kwargs.pop("id_prefix", None)  # the split owns the id prefixes
    train = generate_tasks(n_train, seed, id_prefix="train", **gen_kwargs)
    seen = {(r["question"], r["images"][0]) for r in train}
    heldout_seed = derive_seed(seed, "heldout")
    stream = iter_tasks(heldout_seed, id_prefix="heldout", **gen_kwargs)
    heldout, skipped = [], 0
    while len(heldout) < n_heldout:
        row = next(stream)
        if (row["question"], row["images"][0]) in seen:
            skipped += 1
        else:
            heldout.append(row)
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    write_prompts_parquet(train, out / "train.parquet")
    write_prompts_parquet(heldout, out / "heldout.parquet")

    defaults = {k: p.default for k, p in inspect.signature(generate_tasks).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "id_prefix"}
    params = {**defaults, **gen_kwargs}
    has_qa = any(r["answer"] for r in train) and any(r["answer"] for r in heldout)
    info = {
        "params": {"format": FORMAT, "n_train": n_train, "n_heldout": n_heldout, "seed": seed,
                   "heldout_seed": heldout_seed,
                   **{k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}},
        "splits": {"train": _split_stats(train), "heldout": _split_stats(heldout)},
        "heldout_skipped_as_in_train": skipped,
        "blind_accuracy_bound": round(blind_accuracy_bound(train, heldout), 4) if has_qa else None,
        "files": {"train": "train.parquet", "heldout": "heldout.parquet"},
    }
    (out / "tasks.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-heldout", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--levels", default="1,2,3", help="comma-separated subset of 1,2,3,4")
    ap.add_argument("--open-fraction", type=float, default=0.15)
    args = ap.parse_args(argv)
    info = write_task_splits(args.out, args.n_train, args.n_heldout, args.seed, open_fraction=args.open_fraction,
                             levels=tuple(int(x) for x in args.levels.split(",")))
    print(json.dumps(info, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()

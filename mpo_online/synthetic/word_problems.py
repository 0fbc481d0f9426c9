"""Deterministic synthetic arithmetic word problems: text-only prompts with checkable answers, for text models.

No dataset download exists here, so the text task family is generated, like the visual one
(mpo_online/synthetic/tasks.py). Every problem is a short story in one of several templates; its answer is an integer
or a fraction (checked by mpo_online.reward.verify, so "9/2" and "4.5" both match), and it carries a worked solution
ending in "Final answer: <n>".

    level 1  one step, one-digit numbers   "Mia has 3 stickers and gets 4 more. How many stickers does Mia have?"
    level 2  one step, two-digit numbers   "Mia has 23 stickers. Mia gets 18 more. How many stickers ... now?"
    level 3  two steps     "... buys 6 pens at 4 dollars each and pays with a 50 dollar note. ... change?"  50 - 6 * 4
    level 4  three steps   "... 3 trays of 12 cookies, eats 4, shares the rest equally among 8 friends"   (3*12-4)/8
             (a share can be a fraction: the answer is then a reduced fraction such as "9/2")
SmolLM2-135M-Instruct, greedy, gets few of levels 2-4 right and samples almost no right answer there (pass@8 ~0 at
temperature 1.0, docs/experiments.md): level 1 is where its samples disagree, which is what the loop learns from.

Rows are in mpo_online.data.prompts.PROMPT_SCHEMA with no images (kind "qa"); `meta` holds the family, level, template
and the operands. Held-out problems come from a derived seed and never repeat a training question.

Launched through `data.task: word_problems` in a config (mpo_online.warm_start.ensure_tasks) or directly:
    python -m mpo_online.synthetic.word_problems --out DIR --n-train 2000 --n-heldout 200 --seed 0 --levels 1 2 3
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from fractions import Fraction
from pathlib import Path

FORMAT = 1
NAMES = ("Mia", "Tom", "Ana", "Leo", "Sara", "Omar", "Nina", "Ben", "Ivy", "Raj", "Lena", "Max")
ITEMS = ("stickers", "marbles", "apples", "books", "stamps", "coins", "shells", "pencils")


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


# Each template: (name, level, draw(rng) -> (question, steps, answer)). `steps` are the worked solution's lines.

def _small_add(rng):
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"{n} has {a} {it} and gets {b} more. How many {it} does {n} have?", [f"{a} + {b} = {a + b}"], \
        Fraction(a + b)


def _small_sub(rng):
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(6, 15)
    b = rng.randint(1, a - 2)
    return f"{n} has {a} {it} and gives away {b}. How many {it} are left?", [f"{a} - {b} = {a - b}"], \
        Fraction(a - b)


def _small_mul(rng):
    it = rng.choice(ITEMS)
    a, b = rng.randint(2, 5), rng.randint(2, 6)
    return f"There are {a} bags with {b} {it} in each bag. How many {it} are there?", [f"{a} * {b} = {a * b}"], \
        Fraction(a * b)


def _add(rng):
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(12, 89), rng.randint(12, 89)
    return (f"{n} has {a} {it}. {n} gets {b} more. How many {it} does {n} have now?",
            [f"{a} + {b} = {a + b}"], Fraction(a + b))


def _sub(rng):
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(40, 99)
    b = rng.randint(11, a - 5)
    return (f"{n} had {a} {it} and gave {b} of them away. How many {it} are left?",
            [f"{a} - {b} = {a - b}"], Fraction(a - b))


def _mul(rng):
    it = rng.choice(ITEMS)
    a, b = rng.randint(3, 12), rng.randint(6, 19)
    return (f"There are {a} boxes with {b} {it} in each box. How many {it} are there in all?",
            [f"{a} * {b} = {a * b}"], Fraction(a * b))


def _change(rng):
    n = rng.choice(NAMES)
    k, p = rng.randint(3, 9), rng.randint(2, 9)
    note = rng.choice((50, 100)) if k * p < 50 else 100
    return (f"{n} buys {k} pens at {p} dollars each and pays with a {note} dollar note. How many dollars of change "
            f"does {n} get?", [f"{k} * {p} = {k * p}", f"{note} - {k * p} = {note - k * p}"], Fraction(note - k * p))


def _reading(rng):
    n = rng.choice(NAMES)
    d, p, extra = rng.randint(3, 9), rng.randint(8, 25), rng.randint(5, 40)
    return (f"{n} reads {p} pages a day for {d} days, then {extra} more pages on the last evening. How many pages "
            f"does {n} read in total?", [f"{p} * {d} = {p * d}", f"{p * d} + {extra} = {p * d + extra}"],
            Fraction(p * d + extra))


def _groups(rng):
    it = rng.choice(ITEMS)
    g, per, lost = rng.randint(3, 8), rng.randint(5, 15), rng.randint(2, 20)
    return (f"A class has {g} groups, and each group collects {per} {it}. Then {lost} {it} are lost. How many "
            f"{it} does the class have now?", [f"{g} * {per} = {g * per}", f"{g * per} - {lost} = {g * per - lost}"],
            Fraction(g * per - lost))


def _cookies(rng):
    n = rng.choice(NAMES)
    trays, per, eaten, friends = rng.randint(2, 5), rng.randint(6, 14), rng.randint(1, 9), rng.randint(2, 8)
    total, left = trays * per, trays * per - eaten
    share = Fraction(left, friends)
    return (f"{n} bakes {trays} trays of {per} cookies, eats {eaten} of them, and shares the rest equally among "
            f"{friends} friends. How many cookies does each friend get?",
            [f"{trays} * {per} = {total}", f"{total} - {eaten} = {left}", f"{left} / {friends} = {_fmt(share)}"],
            share)


def _trip(rng):
    n = rng.choice(NAMES)
    speed, hours, back, legs = rng.randint(20, 60), rng.randint(2, 5), rng.randint(10, 50), rng.randint(2, 4)
    out = speed * hours
    left = out - back
    each = Fraction(left, legs)
    return (f"{n} drives {hours} hours at {speed} km per hour, then drives {back} km back. The distance from the "
            f"start is split into {legs} equal parts. How many km long is each part?",
            [f"{speed} * {hours} = {out}", f"{out} - {back} = {left}", f"{left} / {legs} = {_fmt(each)}"], each)


def _savings(rng):
    n = rng.choice(NAMES)
    weeks, per, spent, price = rng.randint(3, 9), rng.randint(4, 15), rng.randint(5, 20), rng.randint(2, 6)
    saved = weeks * per
    left = saved - spent
    return (f"{n} saves {per} dollars a week for {weeks} weeks, spends {spent} dollars on a game, and buys as many "
            f"{price}-dollar notebooks as possible with the rest. How many dollars are left after that?",
            [f"{weeks} * {per} = {saved}", f"{saved} - {spent} = {left}",
             f"{left} - {price} * {left // price} = {left % price}"], Fraction(left % price))


TEMPLATES = {1: {"small_add": _small_add, "small_sub": _small_sub, "small_mul": _small_mul},
             2: {"add": _add, "sub": _sub, "mul": _mul},
             3: {"change": _change, "reading": _reading, "groups": _groups},
             4: {"cookies": _cookies, "trip": _trip, "savings": _savings}}


def make_problem(rng: random.Random, level: int, id_: str) -> dict:
    """One row of PROMPT_SCHEMA (no images) at `level`."""
    name = rng.choice(sorted(TEMPLATES[level]))
    question, steps, answer = TEMPLATES[level][name](rng)
    solution = "\n".join(steps + [f"Final answer: {_fmt(answer)}"])
    meta = {"family": "word_problems", "level": level, "op": name, "steps": len(steps)}
    return {"id": id_, "question": question, "images": [], "answer": _fmt(answer), "kind": "qa",
            "solution": solution, "meta": json.dumps(meta, sort_keys=True)}


MAX_REPEATS_IN_A_ROW = 20_000  # draws of already-seen questions before generate_problems gives up


def generate_problems(n: int, seed: int, *, levels: tuple[int, ...] = (1, 2, 3), id_prefix: str = "wp",
                      exclude: set[str] = frozenset()) -> list[dict]:
    """n problems, levels drawn in turn (a balanced mix), questions in `exclude` skipped. Same args -> same rows."""
    bad = [lv for lv in levels if lv not in TEMPLATES]
    if bad or not levels:
        raise ValueError(f"word problem levels must be among {sorted(TEMPLATES)}, got {list(levels)}")
    rng, rows, seen, i, misses = random.Random(seed), [], set(exclude), 0, 0
    while len(rows) < n:
        row = make_problem(rng, levels[i % len(levels)], f"{id_prefix}-{len(rows):06d}")
        i += 1
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
            misses = 0
            continue
        # a level has a finite set of questions: when it runs out, say so instead of drawing forever
        misses += 1
        if misses > MAX_REPEATS_IN_A_ROW:
            raise ValueError(f"levels {list(levels)} ran out of distinct questions after {len(rows)} of the {n} asked"
                             f" ({len(exclude)} excluded): ask for fewer problems or add a level")
    return rows


def write_problem_splits(out_dir: str | Path, n_train: int, n_heldout: int, seed: int,
                         levels: tuple[int, ...] = (1, 2, 3)) -> dict:
    """train.parquet and heldout.parquet (PROMPT_SCHEMA) + tasks.json with the parameters and split counts."""
    from mpo_online.data.prompts import write_prompts_parquet
    from mpo_online.synthetic.tasks import derive_seed

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = generate_problems(n_train, seed, levels=tuple(levels), id_prefix="train")
    heldout = generate_problems(n_heldout, derive_seed(seed, "heldout"), levels=tuple(levels), id_prefix="heldout",
                                exclude={r["question"] for r in train})
    write_prompts_parquet(train, out / "train.parquet")
    write_prompts_parquet(heldout, out / "heldout.parquet")

    def stats(rows):
        metas = [json.loads(r["meta"]) for r in rows]
        return {"n": len(rows), "by_level": dict(sorted(Counter(str(m["level"]) for m in metas).items())),
                "by_op": dict(sorted(Counter(m["op"] for m in metas).items())),
                "fraction_answers": sum("/" in r["answer"] for r in rows)}
    info = {"params": {"family": "word_problems", "format": FORMAT, "n_train": n_train, "n_heldout": n_heldout,
                       "seed": seed, "levels": list(levels)},
            "splits": {"train": stats(train), "heldout": stats(heldout)},
            "files": {"train": "train.parquet", "heldout": "heldout.parquet"}}
    (out / "tasks.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-heldout", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3])
    a = p.parse_args(argv)
    print(json.dumps(write_problem_splits(a.out, a.n_train, a.n_heldout, a.seed, tuple(a.levels)), indent=1))


if __name__ == "__main__":
    main()

"""The synthetic tasks' chain of thought: render a worked solution, and check a model's chain against the image.

A chain scans the 4x4 grid once per colour the question asks about, one character per cell in reading order:
"." for a cell without that colour, else the running count of that colour so far; the line ends with the count.

    "How many red and blue shapes are there in total?<image>"
    r: 1......2.3...... = 3
    b: ....1......2.... = 2
    3 + 2 = 5
    Final answer: 5

Why this shape (each point was measured to matter for the tiny default policy; docs/experiments.md, "How the
learning curve was found"):
- Every character of a scan line is a perception decision the answer depends on, so a chain whose final answer is
  right almost always read the image right: correct samples are correct for the right reason, and a preference
  pair differs exactly where the image was misread. (With a chain that names every cell's colour, a correct answer
  still carried wrong cells of other colours, and training on it taught them.)
- One character per cell, and the image sits right before the response (tasks put the `<image>` placeholder after
  the question), so cell k of any line is at a fixed distance from image token k: a position-only attention head
  reads the grid. With the image before a question of varying length, the scan had to be found by content and the
  policy learnt it several times slower.
- Every other step is local: a running count is the previous digit + 1, a line's count copies its last digit, the
  arithmetic reads two copied numbers, the final answer copies the result. So the answer follows from what the chain
  states — `check_chain` verifies that, and the warm start drills it on text-only chains first.

Describe tasks ("Describe the image.", no ground truth) answer with one such line per colour of the palette.
Pure functions, no I/O; used by mpo_online.synthetic.tasks (demonstrations), mpo_online.evaluate, the loop's round
records and the pairs' optional chosen-side check (chosen_checker, config pairs.chosen_check).
"""

from __future__ import annotations

import json
import re

COLOR_LETTERS = {"red": "r", "green": "g", "blue": "b", "yellow": "y"}
OP_SYMBOL = {"sum": "+", "diff": "-", "product": "*", "scale": "*"}
_LINE = re.compile(r"^([a-z]): ([.0-9]+) = (\d+)$")
_ARITH = re.compile(r"^(\d+) ([+\-*]) (\d+) = (-?\d+)$")
_FINAL = re.compile(r"^Final answer: (-?\d+)$")


def scan_line(cells: str, letter: str) -> tuple[str, int]:
    """("r: 1......2.3...... = 3", 3): the tally line of one colour over the row-major cell string."""
    k, out = 0, []
    for ch in cells:
        if ch == letter:
            k += 1
            out.append(str(k))
        else:
            out.append(".")
    return f"{letter}: {''.join(out)} = {k}", k


def _operands(op: str, counts: list[int], factor: int | None) -> tuple[int, int]:
    """The arithmetic line's two numbers: the two counts, or (scale) the one count and the question's factor."""
    return (counts[0], factor) if op == "scale" else (counts[0], counts[1])


_APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def worked_solution(op: str, colors: list[str], cells: str, factor: int | None = None) -> tuple[str, int]:
    """The careful chain for a question (op count/sum/diff/product over `colors`, or scale: one colour's count times
    the question's `factor`) and its answer."""
    lines, counts = [], []
    for c in colors:
        line, k = scan_line(cells, COLOR_LETTERS[c])
        lines.append(line)
        counts.append(k)
    if op == "count":
        n = counts[0]
    else:
        x, y = _operands(op, counts, factor)
        n = _APPLY[OP_SYMBOL[op]](x, y)
        lines.append(f"{x} {OP_SYMBOL[op]} {y} = {n}")
    return "\n".join(lines + [f"Final answer: {n}"]), n


def describe_solution(cells: str, palette: tuple[str, ...]) -> str:
    """The description of a grid: one tally line per palette colour."""
    return "\n".join(scan_line(cells, COLOR_LETTERS[c])[0] for c in palette)


def glance_solution(op: str, colors: list[str], counts: dict[str, int], factor: int | None = None) -> str:
    """A chain that states the counts at a glance ("I see 3 red and 2 blue. 3 + 2 = 5."), without scanning."""
    xs = [counts[c] for c in colors]
    seen = "I see " + " and ".join(f"{x} {c}" for x, c in zip(xs, colors)) + "."
    if op == "count":
        return f"{seen}\nFinal answer: {xs[0]}"
    x, y = _operands(op, xs, factor)
    n = _APPLY[OP_SYMBOL[op]](x, y)
    return f"{seen} {x} {OP_SYMBOL[op]} {y} = {n}.\nFinal answer: {n}"


def check_chain(text: str, op: str, colors: list[str], cells: str, factor: int | None = None) -> dict:
    """What a model's chain states and whether it holds together (`factor`: the scale op's multiplier).

    Returns {"scanned": the chain has one well-formed scan line per asked colour (in order),
             "consistent": every line's tallies run 1..k and its count is k, the arithmetic line is right for the
                           stated counts, and the final answer is what the chain computed (the answer follows from
                           the chain; checked for scanned chains only, else False),
             "perceived": every scan line matches the image}.
    Never raises on model output; anything unparseable is simply not scanned/consistent.
    """
    lines = [ln.strip() for ln in text.strip().splitlines()]
    out = {"scanned": False, "consistent": False, "perceived": False}
    want = [COLOR_LETTERS.get(c) for c in colors]
    parsed = [_LINE.match(ln) for ln in lines[:len(want)]]
    if len(parsed) != len(want) or not all(parsed) or [m.group(1) for m in parsed] != want \
            or any(len(m.group(2)) != len(cells) for m in parsed):
        return out
    out["scanned"] = True
    out["perceived"] = all(m.group(0) == scan_line(cells, m.group(1))[0] for m in parsed)
    counts = []
    ok = True
    for m in parsed:
        digits = [int(ch) for ch in m.group(2) if ch != "."]
        ok &= digits == list(range(1, len(digits) + 1)) and int(m.group(3)) == len(digits)
        counts.append(int(m.group(3)))
    rest = lines[len(want):]
    if op == "count":
        result = counts[0]
    else:
        arith = _ARITH.match(rest[0]) if rest else None
        if arith is None:
            return out
        x, sym, y, n = int(arith.group(1)), arith.group(2), int(arith.group(3)), int(arith.group(4))
        ok &= (x, y) == _operands(op, counts, factor) and sym == OP_SYMBOL[op] and n == _APPLY[sym](x, y)
        result, rest = n, rest[1:]
    final = _FINAL.match(rest[0]) if rest else None
    out["consistent"] = bool(ok and final is not None and int(final.group(1)) == result)
    return out


def check_task_chain(text: str, meta: dict) -> dict:
    """check_chain against a grid task's parsed meta (its op, asked colours, cells and, for level 4, factor)."""
    return check_chain(text, meta["op"], meta["colors"], meta["cells"], meta.get("factor"))


def row_meta(row: dict) -> dict | None:
    """A prompt row's parsed meta when the row is a synthetic grid task (its meta has `cells`), else None."""
    meta = json.loads(row.get("meta") or "{}")
    return meta if isinstance(meta, dict) and "cells" in meta else None


def synthetic_meta(rows: list[dict]) -> dict[str, dict]:
    """{prompt id: parsed meta} for the prompt rows that are synthetic grid tasks (their meta has `cells`)."""
    metas = {r["id"]: row_meta(r) for r in rows}
    return {k: v for k, v in metas.items() if v is not None}


CHOSEN_CHECKS = ("answer", "consistent", "perceived")  # config.PairsConfig.chosen_check


def chosen_checker(mode: str, meta: dict | None):
    """text -> bool: may a correct response of this task be taught as "chosen" (mpo_online.pairs `chosen_ok`)?

    "answer": None (any correct final answer will do: the paper's rule). "consistent": the chain must hold together
    (check_chain's "consistent"), so a right answer reached by luck (a glance, or a jump the chain does not support)
    is not taught. "perceived": consistent and every scan line matches the annotated grid. Only synthetic grid tasks
    (`meta` with `cells`, see row_meta) carry what the check needs; for any other row (meta None) this is None, i.e.
    the "answer" rule."""
    if mode not in CHOSEN_CHECKS:
        raise ValueError(f"chosen check must be one of {CHOSEN_CHECKS}, got {mode!r}")
    if mode == "answer" or not meta or "cells" not in meta:
        return None
    needed = ("consistent",) if mode == "consistent" else ("consistent", "perceived")

    def chosen_ok(text: str) -> bool:
        checked = check_task_chain(text, meta)
        return all(checked[k] for k in needed)
    return chosen_ok


def pair_chain_rates(pairs: list[dict], meta_by_id: dict[str, dict]) -> dict:
    """Over correctness pairs (pair-schema rows) of synthetic tasks: how often the chosen (correct) and the rejected
    responses scan the grid (a worked chain, not a glance), read the image right and hold together. A high
    chosen_perceived means correct samples are correct for the right reason, so the pairs carry perception signal;
    chosen_scanned > rejected_scanned means the pairs prefer worked chains. {} when no pair is of a synthetic task."""
    from mpo_online.data.records import message_text

    n, rates = 0, dict.fromkeys(("chosen_scanned", "chosen_perceived", "chosen_consistent", "rejected_scanned",
                                 "rejected_perceived", "rejected_consistent"), 0)
    for p in pairs:
        meta = meta_by_id.get(p["prompt_id"])
        if p["kind"] != "correctness" or not meta or "cells" not in meta:
            continue
        n += 1
        for side in ("chosen", "rejected"):
            c = check_task_chain(message_text(p[side]), meta)
            rates[f"{side}_scanned"] += c["scanned"]
            rates[f"{side}_perceived"] += c["perceived"]
            rates[f"{side}_consistent"] += c["consistent"]
    return {"pairs_checked": n, **{k: v / n for k, v in rates.items()}} if n else {}

"""Grade model answers: pull the final answer out of a completion and decide whether it equals the gold answer.

    from mpo_online.reward.verify import extract_final_answer, answers_match
    pred = extract_final_answer(completion)       # "7" from "... Final answer: 7." (None when there is none)
    ok = pred is not None and answers_match(pred, gold)

The reward function calls these on raw model output, i.e. hostile input, from Ray worker threads. So:
- Nothing here calls eval, `sympify` or `parse_expr` (they eval strings). A small tokenizer and recursive-descent
  parser (mpo_online/reward/mathexpr.py) accept a safe subset (numbers, + - * / ^ **, brackets, unary minus, implicit
  multiplication, \\frac, \\dfrac, \\sqrt, \\sqrt[n], pi, single-letter variables) and build a tiny expression
  tree: exact `fractions.Fraction`s folded as they are built, and ("var" | "pi" | "add" | "mul" | "pow") tuples
  otherwise.
- Every step is bounded by construction, not by a timeout (signal.alarm only works on the main thread; a process
  pool per call costs more than grading): raw input <= 1000 chars, parsed text <= 200 chars, <= 50 digits per
  number, nesting depth <= 50, exponents |p/q| with |p|, q <= 1000, exact powers only while (bits of base) * |n|
  <= 10,000, no exact number above 20,000 bits. Refusing means "does not parse", never an exception.
- Equivalence: two exact rationals must be equal; anything else is decided by evaluating both trees with Python
  complex floats at 5 fixed pseudo-random points (variables in [0.5, 2.5]; a point that overflows or divides by
  zero is skipped, >= 3 must agree) to 1e-9 relative, or 1e-3 relative when either side contains a decimal literal,
  so "0.333" matches 1/3 and "3.14" matches pi, while "1000" vs "1001" never passes a tolerance.
- No sympy. Its automatic evaluation is not bounded: `sympy.sqrt(1/(-999 - y**50))` takes 2 s and `y**200` 45 s
  (Pow._eval_power -> as_real_imag -> polynomial powers), i.e. `\\sqrt{\\frac{1}{-999-y^{200}}}` would hang a grader,
  and `simplify` is worse. Random-point evaluation (the usual polynomial-identity test) gives `x+1` == `1+x`,
  `(x+1)^2` == `x^2+2x+1`, `\\sqrt{8}` == `2\\sqrt{2}` in microseconds. The module imports only the stdlib.

Why not the `math-verify` package: it runs `sympy.parse_expr` (eval) on extracted expressions and its timeouts use
signal.alarm; with the timeout disabled for threads, `verify(parse("$9^{9^{9^9}}$"), parse("$2$"))` was still
running after 20 s (checked in a throwaway venv, math-verify 0.9.0).

Matching rules besides algebra: text is compared case- and whitespace-insensitively ("Red" == " red "); thousands
separators are dropped ("1,234" == "1234"); "x = 5" compares as "5"; a trailing unit word or % or degree sign is
ignored when only one side has it or both have the same one ("5 apples" == "5", "5 apples" != "5 pears");
comma-separated tuples compare element-wise in order, with the same brackets on both sides ("(1,2)" == "1, 2",
"(1,2)" != "[1,2]"). Sets are compared in order too (no permutation search, to keep the cost bounded).
"""

from __future__ import annotations

import re

from mpo_online.reward.mathexpr import BRACKETS, MAX_EXPR, parse, symbols, trees_equal

MAX_RAW = 1000  # longer inputs are not answers; refuse before any regex work
MAX_ITEMS = 20  # tuple elements

# ----------------------------------------------------------------------------------------------- extraction

_FINAL_RE = re.compile(r"final[\s*_]*answer[\s*_]*[:：]", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} with balanced braces. Linear: an earlier box is scanned only up to the start
    of the later one, since if it extends past that point it contains the unclosed later box and cannot close."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    limit = len(text)
    for start in reversed(starts):
        depth = 1
        for i in range(start, limit):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    content = text[start:i].strip()
                    if content:
                        return content
                    break
        limit = start
    return None


def _clean_answer(ans: str) -> str:
    if _BOXED_RE.search(ans):
        boxed = _last_boxed(ans)
        if boxed:
            ans = boxed
    for _ in range(5):  # peel wrappers like "**$7$**." until stable
        before = ans
        ans = ans.strip().strip("*").strip()
        ans = ans.rstrip(".").rstrip()
        for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if ans.startswith(left) and ans.endswith(right) and len(ans) >= len(left) + len(right):
                ans = ans[len(left) : len(ans) - len(right)]
        if ans == before:
            break
    return ans.strip()


def extract_final_answer(text: str) -> str | None:
    """Text after the last "Final answer:" (any case) up to the end of its line (or the next line when that is
    empty), else the content of the last balanced \\boxed{...}; None if neither gives a non-empty answer."""
    if not isinstance(text, str):
        return None
    try:
        last = max(_FINAL_RE.finditer(text), key=lambda m: m.start(), default=None)
        if last is not None:
            lines = text[last.end() :].split("\n", 2)
            for line in lines[:2]:
                ans = _clean_answer(line)
                if ans:
                    return ans
        boxed = _last_boxed(text)
        return (_clean_answer(boxed) or None) if boxed is not None else None
    except Exception:  # noqa: BLE001 - never let grading crash a rollout
        return None


# ----------------------------------------------------------------------------------------------- normalisation

_WRAPPER_RE = re.compile(r"\\(?:boxed|fbox|text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{")
_DROP = (
    "\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\$", "\\ ", "$", "\\(", "\\)", "\\[", "\\]",
)  # fmt: skip
_REPLACE = (
    ("\\%", "%"), ("\\{", "("), ("\\}", ")"), ("^{\\circ}", "°"), ("^\\circ", "°"), ("\\circ", "°"),
    ("\\degree", "°"), ("\\cdot", "*"), ("\\times", "*"), ("\\ast", "*"), ("\\div", "/"), ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"), ("−", "-"), ("×", "*"), ("÷", "/"), ("·", "*"), ("π", "\\pi"),
)  # fmt: skip
_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+(?!\d)")  # 1,234  1{,}234  1\,234
_SEPARATOR_RE = re.compile(r",|\{,\}|\\,")
# LaTeX reads "\frac12" as \frac{1}{2} and "\sqrt2" as \sqrt{2}: one digit per argument.
_FRAC_DIGITS_RE = re.compile(r"\\frac\s*(\d)\s*(\d)")
_SQRT_DIGIT_RE = re.compile(r"\\sqrt\s*(\d)")


def _unwrap(s: str) -> str:
    """Replace \\text{...}, \\boxed{...} etc. by their content (balanced braces); each pass shortens s."""
    while (m := _WRAPPER_RE.search(s)) is not None:
        depth, end = 1, None
        for i in range(m.end(), len(s)):
            depth += {"{": 1, "}": -1}.get(s[i], 0)
            if depth == 0:
                end = i
                break
        s = s[: m.start()] + (s[m.end() :] if end is None else s[m.end() : end] + s[end + 1 :])
    return s


def _normalise(s: str) -> str:
    s = _THOUSANDS_RE.sub(lambda m: _SEPARATOR_RE.sub("", m.group(0)), _unwrap(s))
    for old in _DROP:
        s = s.replace(old, " ")
    for old, new in _REPLACE:
        s = s.replace(old, new)
    s = _SQRT_DIGIT_RE.sub(r"\\sqrt{\1}", _FRAC_DIGITS_RE.sub(r"\\frac{\1}{\2}", s))
    return " ".join(s.split()).rstrip(".").strip()


_ASSIGN_RE = re.compile(r"^[A-Za-z]\s*=\s*(?P<rhs>[^=]+)$")
_UNIT_RE = re.compile(r"^(?P<value>.*?[\d)\]}])\s*(?P<unit>%|°|[A-Za-z]{2,}(?:\s+[A-Za-z]+)*)$")
_INT_RE = re.compile(r"^[+-]?\d{1,50}$")


def _text_key(s: str) -> str:
    return " ".join(s.casefold().split())


def _unit_key(unit: str) -> str:
    unit = _text_key(unit)
    return unit[:-1] if unit.endswith("s") and len(unit) > 2 else unit


def _match_single(pred: str, gold: str) -> bool:
    if _text_key(pred) == _text_key(gold):
        return True
    if _INT_RE.match(pred) and _INT_RE.match(gold):  # counting-task fast path
        return int(pred) == int(gold)
    pred = (m.group("rhs") if (m := _ASSIGN_RE.match(pred)) else pred).strip()
    gold = (m.group("rhs") if (m := _ASSIGN_RE.match(gold)) else gold).strip()
    sides = []
    for s in (pred, gold):
        parsed, unit = parse(s), None
        if parsed is None and len(s) <= MAX_EXPR and (m := _UNIT_RE.match(s)):
            parsed, unit = parse(m.group("value").strip()), _unit_key(m.group("unit"))
            if parsed is not None and symbols(parsed[0]):
                parsed = None  # "x apples": only plain numbers carry units
        if parsed is None:
            return False  # not math, and the text comparison above already failed
        sides.append((parsed, unit))
    (pa, unit_a), (pb, unit_b) = sides
    if unit_a and unit_b and unit_a != unit_b:
        return False
    return trees_equal(pa[0], pb[0], approx=pa[1] or pb[1])


def _split_top(s: str) -> tuple[str, list[str]]:
    """('()' / '[]' / '' brackets, top-level comma-separated parts) of s."""
    brackets = ""
    if len(s) >= 2 and s[0] in BRACKETS and s[-1] in ")]}":
        depth = 0  # only strip if the first bracket closes at the very end: "(1)+(2)" keeps its brackets
        for i, c in enumerate(s):
            depth += (c in "([{") - (c in ")]}")
            if depth == 0 and i < len(s) - 1:
                break
        else:
            brackets, s = s[0] + s[-1], s[1:-1]
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if c == "," and depth == 0:
            parts.append(s[start:i].strip())
            start = i + 1
    parts.append(s[start:].strip())
    return brackets, parts


def answers_match(pred: str, gold: str) -> bool:
    """True if pred and gold are the same answer (see module docstring). Never raises; False for non-str input."""
    if not isinstance(pred, str) or not isinstance(gold, str) or len(pred) > MAX_RAW or len(gold) > MAX_RAW:
        return False
    try:
        pred, gold = _normalise(pred), _normalise(gold)
        if not pred or not gold:
            return False
        if _text_key(pred) == _text_key(gold):
            return True
        (br_p, parts_p), (br_g, parts_g) = _split_top(pred), _split_top(gold)
        if len(parts_p) > 1 or len(parts_g) > 1:
            if len(parts_p) != len(parts_g) or len(parts_p) > MAX_ITEMS:
                return False
            if br_p != br_g and {br_p, br_g} != {"", "()"}:  # "(1,2)" == "1, 2" but != "[1,2]"
                return False
            return all(_match_single(p, g) for p, g in zip(parts_p, parts_g))
        return _match_single(pred, gold)
    except Exception:  # noqa: BLE001 - hostile input must never crash grading
        return False

"""Safe arithmetic expressions for the answer verifier: parse a small math subset into exact trees and compare them.

    tree_and_flag = parse("\\frac{1}{2}x + 3")   # (tree, has_decimal) or None outside the safe subset
    trees_equal(a, b, approx=False)                  # exact for rationals, else by value at fixed random points

Used only by mpo_online.reward.verify (see its docstring for the whole grading contract and why not sympy). Inputs are
hostile model output, so every step is bounded by construction: no eval, no timeouts, only the stdlib.
"""

from __future__ import annotations

import cmath
import random
import re
from fractions import Fraction

MAX_EXPR = 200  # normalised length the math parser accepts
MAX_DIGITS = 50  # per numeric literal
MAX_DEPTH = 50  # bracket / unary nesting
MAX_EXP = 1000  # |p| and q of a rational exponent p/q
MAX_POW_BITS = 10_000  # bits(rational base) * |n| for an exactly computed power
MAX_BITS = 20_000  # any exact rational while building
N_POINTS = 5  # evaluation points when variables are present


# ----------------------------------------------------------------------------------------------- safe math parser
# Expressions are small trees: a Fraction (exact rational, folded eagerly under size limits), ("var", name),
# ("pi",), ("add", a, b), ("mul", a, b) or ("pow", base, exp). Building one does O(1) work per token.


class _Refuse(Exception):
    """Input outside the safe subset or beyond a size limit."""


_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3}(?![\d.]))?)|(?P<cmd>\\[A-Za-z]+)|(?P<word>[A-Za-z]+)"
    r"|(?P<op>\*\*|[-+*/^()\[\]{}]))"
)
_COMMANDS = {"\\frac": "frac", "\\sqrt": "sqrt", "\\pi": "pi", "sqrt": "sqrt", "pi": "pi"}
BRACKETS = {"(": ")", "[": "]", "{": "}"}


def _tokenize(s: str) -> list[tuple[str, str]]:
    tokens, pos, s = [], 0, s.rstrip()
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if m is None:
            raise _Refuse(s[pos:])
        pos = m.end()
        if m.group("num") is not None:
            if sum(c.isdigit() for c in m.group("num")) > MAX_DIGITS:
                raise _Refuse("too many digits")
            tokens.append(("num", m.group("num")))
        elif m.group("op") is not None:
            tokens.append(("op", "^" if m.group("op") == "**" else m.group("op")))
        else:
            word = m.group("cmd") or m.group("word")
            if word in _COMMANDS:
                tokens.append((_COMMANDS[word], word))
            elif len(word) == 1:
                tokens.append(("var", word))
            else:  # "red" must not become r*e*d, nor "no" equal "on"
                raise _Refuse(word)
    return tokens


def _exact(q: Fraction) -> Fraction:
    if max(q.numerator.bit_length(), q.denominator.bit_length()) > MAX_BITS:
        raise _Refuse("number too large")
    return q


def _add(a, b):
    return _exact(a + b) if isinstance(a, Fraction) and isinstance(b, Fraction) else ("add", a, b)


def _mul(a, b):
    return _exact(a * b) if isinstance(a, Fraction) and isinstance(b, Fraction) else ("mul", a, b)


def _pow(base, exp):
    """Exact when both sides are rationals and the exponent an integer; size checks come before any arithmetic."""
    if isinstance(exp, Fraction):
        if abs(exp.numerator) > MAX_EXP or exp.denominator > MAX_EXP:
            raise _Refuse("exponent too large")
        if exp.denominator == 1 and isinstance(base, Fraction):
            n = exp.numerator
            if base == 0 and n < 0:
                raise _Refuse("division by zero")
            bits = max(base.numerator.bit_length(), base.denominator.bit_length(), 1)
            if abs(n) > 1 and bits * abs(n) > MAX_POW_BITS:
                raise _Refuse("power too large")
            return _exact(base**n)
    return ("pow", base, exp)


class _Parser:
    """expr := term (('+'|'-') term)*;  term := unary (('*'|'/'|implicit) unary)*;  unary := ('-'|'+') unary | power;
    power := primary ('^' unary)?;  primary := num | var | pi | (expr) | [expr] | {expr} | \\frac G G | \\sqrt[n]? G."""

    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens, self.pos, self.depth, self.has_decimal = tokens, 0, 0, False

    def parse(self):
        if not self.tokens:
            raise _Refuse("empty")
        tree = self.expr()
        if self.pos != len(self.tokens):
            raise _Refuse("trailing tokens")
        return tree

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Refuse("too deep")

    def expr(self):
        left = self.term()
        while (tok := self.peek()) in (("op", "+"), ("op", "-")):
            self.pos += 1
            right = self.term()
            left = _add(left, right if tok[1] == "+" else _mul(Fraction(-1), right))
        return left

    def term(self):
        left = self.unary()
        while (tok := self.peek()) is not None:
            if tok in (("op", "*"), ("op", "/")):
                self.pos += 1
                right = self.unary()
                left = _mul(left, _pow(right, Fraction(-1)) if tok[1] == "/" else right)
            elif tok[0] in ("num", "var", "pi", "frac", "sqrt") or tok in (("op", "("), ("op", "["), ("op", "{")):
                if tok[0] == "num" and self.tokens[self.pos - 1][0] == "num":
                    raise _Refuse("two numbers in a row")  # "1 2" is not 2
                left = _mul(left, self.power())  # implicit multiplication: 2x, 3\sqrt{2}, (a)(b)
            else:
                break
        return left

    def unary(self):
        self.enter()
        if (tok := self.peek()) in (("op", "-"), ("op", "+")):
            self.pos += 1
            inner = self.unary()
            result = _mul(Fraction(-1), inner) if tok[1] == "-" else inner
        else:
            result = self.power()
        self.depth -= 1
        return result

    def power(self):
        base = self.primary()
        if self.peek() == ("op", "^"):
            self.pos += 1
            return _pow(base, self.unary())  # right-associative; allows 2^-1
        return base

    def group(self):
        """A LaTeX argument: {expr}, (expr) or a single atom (\\frac ab, \\sqrt x)."""
        tok = self.peek()
        if tok is None or not (tok[0] in ("num", "var", "pi") or tok in (("op", "{"), ("op", "("))):
            raise _Refuse("bad argument")
        return self.primary()

    def primary(self):
        if (tok := self.peek()) is None:
            raise _Refuse("unexpected end")
        self.pos += 1
        kind, value = tok
        if kind == "num":
            mant, _, ex = value.lower().partition("e")  # digits, one dot, |exponent| <= 999 (token regex)
            self.has_decimal |= "." in value or bool(ex)
            return _exact(Fraction(mant) * Fraction(10) ** int(ex or 0))
        if kind == "var":
            return ("var", value)
        if kind == "pi":
            return ("pi",)
        if kind == "frac":
            num = self.group()
            return _mul(num, _pow(self.group(), Fraction(-1)))
        if kind == "sqrt":
            index = Fraction(2)
            if self.peek() == ("op", "["):
                self.pos += 1
                index = self.expr()
                if self.peek() != ("op", "]") or not isinstance(index, Fraction) or index.denominator != 1:
                    raise _Refuse("bad root index")
                self.pos += 1
            if not 2 <= index <= 100:
                raise _Refuse("bad root index")
            return _pow(self.group(), 1 / index)
        if kind == "op" and value in BRACKETS:
            self.enter()
            inner = self.expr()
            if self.peek() != ("op", BRACKETS[value]):
                raise _Refuse("unbalanced")
            self.pos += 1
            self.depth -= 1
            return inner
        raise _Refuse(f"unexpected {value}")


def parse(s: str):
    """(tree, has_decimal) or None if s is not in the safe subset."""
    if not s or len(s) > MAX_EXPR:
        return None
    try:
        parser = _Parser(_tokenize(s))
        return parser.parse(), parser.has_decimal
    except (_Refuse, ArithmeticError, ValueError, RecursionError, MemoryError):
        return None


# ----------------------------------------------------------------------------------------------- equivalence


class _EvalFail(Exception):
    pass


def symbols(tree) -> set[str]:
    if isinstance(tree, Fraction):
        return set()
    if tree[0] == "var":
        return {tree[1]}
    return set().union(*(symbols(child) for child in tree[1:]))


def _evaluate(tree, env: dict[str, complex]) -> complex:
    """Complex-float value of a tree; raises _EvalFail on overflow or division by zero."""
    try:
        if isinstance(tree, Fraction):
            value = complex(tree.numerator / tree.denominator)  # int true division: rounded or OverflowError
        elif tree[0] == "var":
            value = env[tree[1]]
        elif tree[0] == "pi":
            value = complex(cmath.pi)
        else:
            a, b = _evaluate(tree[1], env), _evaluate(tree[2], env)
            if tree[0] == "add":
                value = a + b
            elif tree[0] == "mul":
                value = a * b
            else:  # integral exponents use exact repeated multiplication for small n in CPython
                value = a ** (int(b.real) if b.imag == 0 and b.real.is_integer() and abs(b.real) < 1e6 else b)
    except (OverflowError, ZeroDivisionError, ValueError) as exc:
        raise _EvalFail(str(exc)) from None
    if not cmath.isfinite(value):
        raise _EvalFail("not finite")
    return complex(value.real, value.imag or 0.0)  # no -0.0 imaginary parts: roots stay on the principal branch


def trees_equal(a, b, approx: bool) -> bool:
    """Exact rationals compare exactly (with 1e-3 relative slack if a decimal was written); anything else by value
    at N_POINTS fixed pseudo-random points in [0.5, 2.5] for the variables of either side."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b or (approx and abs(a - b) <= Fraction(1, 1000) * max(abs(a), abs(b)))
    names = sorted(symbols(a) | symbols(b))
    rel, abs_tol = (1e-3, 1e-9) if approx else (1e-9, 1e-12)
    rng = random.Random(1234)  # fixed: the same pair always gets the same verdict
    agree = 0
    for _ in range(N_POINTS if names else 1):
        env = {name: complex(rng.uniform(0.5, 2.5)) for name in names}
        try:
            va, vb = _evaluate(a, env), _evaluate(b, env)
        except _EvalFail:
            continue
        if abs(va - vb) > max(rel * max(abs(va), abs(vb)), abs_tol):
            return False
        agree += 1
    return agree >= (3 if names else 1)

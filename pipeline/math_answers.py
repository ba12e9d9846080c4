"""Final answers of math solutions, found and compared: what the `math_answer` reward checks.

    final_answer("... so she has 3/4 left. The answer is $0.75$.")    # "0.75"
    answers_match("0.75", "\\frac{3}{4}")                              # True
    reference_answer({"answer": "Natalia sold 48/2 = 24 ... #### 72"})  # "72" (GSM8K's layout)

An answer is found, in order: the last `\\boxed{...}` (or `\\fbox{...}`), the last "#### X" line (GSM8K),
the last "the answer is X" / "answer: X", else the last number in the text. Two answers match when
both read as numbers that are equal (exactly for fractions, decimals and integers; within 1e-6 relative
where a square root or pi makes them irrational), else when their normalised text is equal.

Reading a number never runs code: a small parser takes integers, decimals (with thousands separators),
fractions (`a/b`, `\\frac{a}{b}`, `\\dfrac`, `\\tfrac`), `+ - * / ^`, parentheses, `\\sqrt{}`, `\\pi`,
percent signs, currency signs and trailing units or periods; exponents and digit counts are bounded
so that no answer can make it slow. Normalised text drops `$`, spaces, `\\left`/`\\right`, `\\text{}`
wrappers, degree signs and a leading "x =".
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Optional, Union

Number = Union[Fraction, float]

RELATIVE_TOLERANCE = 1e-6   # for irrational values (sqrt, pi); exact values compare exactly
MAX_DIGITS = 400            # longer numbers are not read as numbers (their text is compared instead)
MAX_EXPONENT = 400


# ---- finding the final answer ---------------------------------------------------------------------

def _braced(text: str, open_index: int) -> Optional[str]:
    """The text inside the balanced braces opening at `open_index`, or None when they never close."""
    depth = 0
    for index in range(open_index, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1:index]
    return None


def last_boxed(text: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` or `\\fbox{...}` in `text` (balanced braces), or None."""
    starts = [match.end() for match in re.finditer(r"\\(?:boxed|fbox)\s*(?=\{)", text)]
    for start in reversed(starts):
        inside = _braced(text, start)
        if inside is not None:
            return inside
    return None


_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*:?\s*([^\n]*)", re.IGNORECASE)
# A minus sign counts only where it cannot be a hyphen or a subtraction ("1990-1995", "5-3").
_NUMBER = re.compile(r"(?:(?<![\w).])-)?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")


def _clause(text: str) -> str:
    """`text` up to the end of its sentence: a period not inside a number, or a line break."""
    match = re.search(r"\.(?!\d)\s|\.$", text)
    return text[:match.start()] if match else text


def final_answer(text: str) -> Optional[str]:
    """The final answer stated in a response or solution `text` (see the module's docstring), or None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    hashes = _HASHES.findall(text)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    stated = _ANSWER_IS.findall(text)
    if stated and _clause(stated[-1]).strip():
        return _clause(stated[-1]).strip()
    numbers = _NUMBER.findall(text.replace("\u2212", "-"))
    return numbers[-1] if numbers else None


def reference_answer(row: dict) -> Optional[str]:
    """The reference final answer of a prompt row: its `reference`, else its `answer` (the part after
    "####" where GSM8K's layout has one), else the last `\\boxed{}` of its `solution` (MATH); None
    when it has none of these."""
    for field in ("reference", "answer"):
        value = row.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str) and value.strip():
            hashes = _HASHES.findall(value) if field == "answer" else []
            return hashes[-1].strip() if hashes and hashes[-1].strip() else value.strip()
    solution = row.get("solution")
    if isinstance(solution, str):
        return last_boxed(solution)
    return None


# ---- normalising --------------------------------------------------------------------------------

_UNWRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_DROP = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", "$", r"\displaystyle", "^\\circ", "^{\\circ}",
         "\u00b0", r"\%", "%")


def normalise(answer: str) -> str:
    """Text form of an answer for comparing answers that do not read as numbers."""
    text = answer.strip().replace("\u2212", "-")
    for _ in range(3):  # nested wrappers
        text = _UNWRAP.sub(r"\1", text)
    for piece in _DROP:
        text = text.replace(piece, "")
    text = text.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
    text = re.sub(r"^\s*[a-zA-Z]\s*=\s*(?=\S)", "", text)  # "x = 5" -> "5"
    text = re.sub(r"\s+", "", text).rstrip(".")
    if re.fullmatch(r"\(?([A-Za-z])\)?", text):   # a choice letter: (B), B
        text = text.strip("()").upper()
    return text


# ---- reading numbers ----------------------------------------------------------------------------

class _NotANumber(ValueError):
    pass


_TOKEN = re.compile(r"\s*(?:(?P<number>\d+(?:\.\d*)?|\.\d+)|(?P<command>\\[a-zA-Z]+)|(?P<symbol>[-+*/^(){}]))")


def _tokens(text: str) -> list:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise _NotANumber(text[position:])
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


class _Parser:
    """Recursive descent over `_tokens`: sums of products of powers of signed atoms, with implicit
    products ("2\\sqrt{3}", "3(4)"); Fractions while exact, floats once a root or pi enters."""

    def __init__(self, tokens: list):
        self.tokens, self.position = tokens, 0

    def peek(self) -> Optional[tuple]:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, value: Optional[str] = None) -> tuple:
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            raise _NotANumber(f"expected {value}")
        self.position += 1
        return token

    def parse(self) -> Number:
        value = self.sum()
        if self.peek() is not None:
            raise _NotANumber("trailing tokens")
        return value

    def sum(self) -> Number:
        value = self.product()
        while self.peek() is not None and self.peek()[1] in "+-":
            sign = self.take()[1]
            right = self.product()
            value = value + right if sign == "+" else value - right
        return value

    def product(self) -> Number:
        value = self.power()
        while True:
            token = self.peek()
            if token is not None and token[1] in ("*", "/", r"\cdot", r"\times", r"\div"):
                operator = self.take()[1]
                right = self.power()
                if operator in ("/", r"\div"):
                    if right == 0:
                        raise _NotANumber("division by zero")
                    value = value / right
                else:
                    value = value * right
            elif token is not None and (token[0] in ("number", "command") or token[1] in "({"):
                value = value * self.power()  # implicit product
            else:
                return value

    def power(self) -> Number:
        base = self.signed()
        if self.peek() is not None and self.peek()[1] == "^":
            self.take()
            exponent = self.signed()
            return _power(base, exponent)
        return base

    def signed(self) -> Number:
        token = self.peek()
        if token is not None and token[1] in "+-":
            self.take()
            value = self.signed()
            return -value if token[1] == "-" else value
        return self.atom()

    def group(self) -> Number:
        """`{...}`, or a single digit or command as LaTeX reads `\\frac34`."""
        token = self.peek()
        if token is not None and token[1] == "{":
            self.take()
            value = self.sum()
            self.take("}")
            return value
        if token is not None and token[0] == "number":
            self.take()
            digits = token[1]
            if len(digits) > 1 and digits.isdigit():  # \frac34: one digit is the argument
                self.tokens[self.position:self.position] = [("number", digits[1:])]
                digits = digits[0]
            return _number(digits)
        return self.atom()

    def atom(self) -> Number:
        kind, value = self.take()
        if kind == "number":
            return _number(value)
        if value in ("(", "{"):
            inner = self.sum()
            self.take(")" if value == "(" else "}")
            return inner
        if value in (r"\frac", r"\dfrac", r"\tfrac"):
            numerator, denominator = self.group(), self.group()
            if denominator == 0:
                raise _NotANumber("division by zero")
            return numerator / denominator
        if value == r"\sqrt":
            radicand = self.group()
            if radicand < 0:
                raise _NotANumber("square root of a negative number")
            root = math.isqrt(radicand.numerator) if isinstance(radicand, Fraction) else None
            if root is not None and radicand.denominator == 1 and root * root == radicand.numerator:
                return Fraction(root)
            return math.sqrt(radicand)
        if value == r"\pi":
            return math.pi
        raise _NotANumber(value)


def _number(digits: str) -> Fraction:
    if len(digits) > MAX_DIGITS:
        raise _NotANumber("too many digits")
    return Fraction(digits)


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise _NotANumber("exponent too large")
    if isinstance(base, Fraction) and isinstance(exponent, Fraction) and exponent.denominator == 1:
        if base == 0 and exponent < 0:
            raise _NotANumber("division by zero")
        if abs(base.numerator).bit_length() * abs(exponent) > 4 * MAX_DIGITS:
            raise _NotANumber("power too large")
        return base ** int(exponent)
    try:
        result = float(base) ** float(exponent)
    except (OverflowError, ZeroDivisionError):
        raise _NotANumber("power out of range") from None
    if isinstance(result, complex):
        raise _NotANumber("complex power")
    return result


_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])")
_CURRENCY = re.compile(r"^[\u00a3\u20ac]")
# Units after a number: a word after a space ("5 m", "42 apples"), or of two letters or more ("5cm"), but
# not one letter ("5x" is an expression).
_TRAILING_WORDS = re.compile(r"(?<=[\d}).])(?:\s+[a-zA-Z]|[a-zA-Z]{2})[a-zA-Z\s.]*$")


def as_number(answer: str) -> Optional[Number]:
    """The value of `answer` when it reads as a number (see the module's docstring), else None."""
    text = answer.strip().replace("\u2212", "-")
    for _ in range(3):
        text = _UNWRAP.sub(lambda match: match.group(1) if re.search(r"\d", match.group(1)) else " " + match.group(1),
                           text)
    for piece in (r"\$", r"\left", r"\right", r"\!", r"\,", r"\;", r"\ ", r"\displaystyle", "$"):
        text = text.replace(piece, "")
    text = _CURRENCY.sub("", text.strip())
    text = re.sub(r"^\s*[a-zA-Z]\s*=\s*(?=\S)", "", text)   # "x = 5"
    text = text.rstrip(" .")
    text = re.sub(r"\\?%$", "", text).rstrip()             # 50% -> 50 (as MATH's graders do)
    text = re.sub(r"(\^\{?\\circ\}?|\u00b0)$", "", text)   # degrees
    text = _TRAILING_WORDS.sub("", text).rstrip(" .")       # units: "42 apples", "5 cm."
    text = _THOUSANDS.sub(lambda match: match.group(0).replace(",", ""), text)
    if not text or "," in text or re.search(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", text)):
        return None
    try:
        return _Parser(_tokens(text)).parse()
    except (_NotANumber, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def numbers_equal(a: Number, b: Number) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-12)


def answers_match(answer: str, reference: str) -> bool:
    """Whether `answer` and `reference` state the same value: equal numbers, else equal normalised text."""
    value, expected = as_number(answer), as_number(reference)
    if value is not None and expected is not None:
        return numbers_equal(value, expected)
    return normalise(answer) == normalise(reference) != ""


def math_answer_reward(response: str, reference: Optional[str]) -> Optional[float]:
    """1.0 when the final answer of `response` matches `reference`, 0.0 when it does not or the response
    states none; None when there is no reference (the row is not scored)."""
    if reference is None or not str(reference).strip():
        return None
    answer = final_answer(response)
    return float(answer is not None and answers_match(answer, str(reference)))

"""The `math_answer` reward's checker on a table of right, wrong and equivalent answers, written by hand:
many of them are cases a string match of the final answer gets wrong (1,200 against 1200, \\frac{1}{2}
against 0.5, "42 apples" against 42), and none may hang or run code."""
import pytest

from pipeline.math_answers import answers_match, final_answer, math_answer_reward, reference_answer

# (response, reference answer, reward): 1 when the response's final answer is the reference's value.
TABLE = [
    # Right, in each place a final answer is stated.
    ("Tom has 3 + 4 = 7 apples.\n#### 7", "7", 1.0),
    ("The answer is 42.", "42", 1.0),
    ("So the total is \\boxed{1200}.", "1200", 1.0),
    ("She gets 5, then 2 more, so 7 in all.", "7", 1.0),                # the last number, as GSM8K graders read
    ("The answer is 3. Checking again: \\boxed{4}", "4", 1.0),          # a boxed answer comes first
    # Right, in another form: thousands separators, currency, percent, units, signs, LaTeX.
    ("The books cost \\boxed{1,200} dollars.", "1200", 1.0),
    ("The answer is $18.00.", "18", 1.0),
    ("#### 50%", "50", 1.0),
    ("The answer is \u22123", "-3", 1.0),                                # a Unicode minus
    ("Final answer: 4.50", "4.5", 1.0),
    ("The answer is 42 apples.", "42", 1.0),
    ("\\boxed{5\\text{ cm}}", "5", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("\\boxed{\\frac34}", "\\frac{3}{4}", 1.0),
    ("\\boxed{0.75}", "3/4", 1.0),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),
    ("\\boxed{2^{10}}", "1024", 1.0),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    # Right, not numbers: compared as normalised text.
    ("\\boxed{\\text{(B)}}", "B", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{x^2 + 1}", "x^2+1", 1.0),
    # Wrong.
    ("The answer is 24", "42", 0.0),
    ("\\boxed{0.33}", "\\frac{1}{3}", 0.0),                             # close is not equal
    ("I first thought 7. The answer is 8.", "7", 0.0),                  # the stated answer, not an earlier number
    ("\\boxed{1,2}", "12", 0.0),                                        # a pair, not a thousands separator
    ("The answer is 5x", "5", 0.0),                                     # an expression, not a unit
    ("\\boxed{2}", "-2", 0.0),
    ("no numbers here", "5", 0.0),                                      # nothing stated
    ("\\boxed{9^{9^{9}}}", "1", 0.0),                                   # too large to evaluate: text compared
]


@pytest.mark.parametrize("response, reference, expected", TABLE)
def test_math_answer_reward_of_the_table(response, reference, expected):
    assert math_answer_reward(response, reference) == expected


def test_the_table_is_not_what_a_string_match_gives():
    """At least 30 cases, 20 of them graded wrongly by comparing the final answer's text."""
    string_match = [float(final_answer(response) == reference) for response, reference, _ in TABLE]
    wrong = [row for row, graded in zip(TABLE, string_match) if graded != row[2]]
    assert len(TABLE) >= 30 and len(wrong) >= 20, len(wrong)


def test_rows_without_a_reference_are_not_scored():
    assert math_answer_reward("The answer is 4.", None) is None
    assert math_answer_reward("The answer is 4.", "  ") is None


def test_reference_answers_of_each_layout():
    assert reference_answer({"question": "q", "answer": "Half of 9 is 9 / 2 = <<9/2=4.5>>4.5.\n#### 4.5"}) == "4.5"
    assert reference_answer({"problem": "p", "solution": "So $x = \\boxed{\\frac{a}{b}}$. Then"}) == "\\frac{a}{b}"
    # MATH-500 gives the answer beside the solution; a `reference` column comes first of all.
    assert reference_answer({"solution": "\\boxed{9}", "answer": "3^2"}) == "3^2"
    assert reference_answer({"reference": 12, "answer": "#### 13"}) == "12"
    assert reference_answer({"prompt": "p"}) is None


def test_answers_that_would_be_slow_or_deep_are_not_evaluated():
    deep = "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}"
    assert math_answer_reward(deep, "2") == 0.0
    assert not answers_match("9^{9^{9^{9}}}", "1") and not answers_match("1" * 5000, "1")
    assert not answers_match("__import__('os')", "0")  # read by a parser, never evaluated as code

"""User reward functions, named `tests.pipeline.user_rewards:<function>` in the tests' configs: one that
works, and one for each way a function can fail."""
import time


def words_over_two(prompts, responses, response_lengths, **columns):
    """1 per response of more than two words; None where the row's `skip` column is true."""
    skip = columns.get("skip") or [None] * len(responses)
    return [None if flag else float(len(response.split()) > 2) for response, flag in zip(responses, skip)]


def fails_on_seven(prompts, responses, response_lengths, **columns):
    return [1.0 / (response.count("seven") == 0) for response in responses]


def text_for_seven(prompts, responses, response_lengths, **columns):
    return ["many" if "seven" in response else 1.0 for response in responses]


def nan_for_seven(prompts, responses, response_lengths, **columns):
    return [float("nan") if "seven" in response else 0.0 for response in responses]


def one_value(prompts, responses, response_lengths, **columns):
    return [1.0]


def a_dict(prompts, responses, response_lengths, **columns):
    return {"reward": 1.0}


def sleeps(prompts, responses, response_lengths, **columns):
    time.sleep(60)
    return [0.0] * len(responses)


def prints_then_scores(prompts, responses, response_lengths, **columns):
    print("a line a user function prints")
    return [float(length) for length in response_lengths]

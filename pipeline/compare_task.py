"""A second synthetic task, for comparing algorithms and optimizers: a gold reward with headroom and
several criteria, and preference pairs labelled by only one of them.

The demo task (pipeline/demo_task.py) is too easy to rank anything on: every policy-optimisation run
finds "the X is so great ." and plateaus near the same gold reward. This task keeps the demo's prompts,
vocabulary and tokenizer style (so the tiny Llama configs work unchanged) and changes two things:

- The gold reward (`gold_reward`) asks for four things at once: several different positive words, the
  prompt's topic, a concise answer (4-8 words) and no repeated words. Its top, 1.0, takes three
  different positive words ("the cat is good , great and fun ."), which the SFT data rarely shows,
  so a policy has room to climb well past the demo's plateau.
- The preference pairs are labelled by a partial rule (`labeler_score`): positive minus negative word
  occurrences, repeats included. It agrees with the gold reward on sentiment and sees nothing else.

The known imperfection: a reward model trained on these pairs learns "more positive words is better",
so it scores repetition ("good , good , good") and length as improvements, and is blind to the topic.
The gold reward penalises the first two. A policy optimising that reward model first raises the gold
reward (negative answers turn positive) and, pushed further, drifts to longer and repetitive answers
that the reward model scores ever higher while the gold reward falls: over-optimisation that shows.
On the shipped pairs (seed 0) the gold reward prefers the rejected answer of 16.5% of the pairs
(`data_stats`' "gold_disagreement", ties counted half).

    write_compare_data("data/compare", seed=0)   # sft.jsonl, pairs.jsonl, prompts.jsonl, eval_prompts.jsonl, tokenizer/
    gold_reward("\\n\\nHuman: tell me about the cat\\n\\nAssistant:", " the cat is good , great and fun .")  # 1.0

Rows use the demo's rm-static text style and its prompt split; one seed gives byte-identical files.
"""
from __future__ import annotations

import random
from pathlib import Path

from pipeline import demo_task
from pipeline.demo_task import (ASSISTANT, DESCRIPTORS, FILES, HUMAN, NEGATIVE, NEGATIVE_VERBS, NEUTRAL_ADJECTIVES,
                                POLITENESS, POSITIVE, POSITIVE_VERBS, PROMPT_TEMPLATES, RESPONSE_TEMPLATES, TOPICS,
                                _adjective, _mean_std, _write_jsonl, draw_rows, prompt_topic,
                                read_jsonl, train_tokenizer, words)

__all__ = ["gold_reward", "gold_reward_batch", "labeler_score", "make_rows", "write_compare_data", "data_stats",
           "read_jsonl"]

# ---- the gold rule's constants (see `gold_reward`) ------------------------------------------------------------

SENTIMENT_WEIGHT = 0.5
SENTIMENT_CAP = 3           # different positive words that earn the full sentiment score
TOPIC_BONUS = 0.25
CONCISE_BONUS = 0.25
MIN_WORDS, MAX_WORDS = 4, 8
LENGTH_PENALTY = 0.1        # per word short of MIN_WORDS or past MAX_WORDS
REPEAT_PENALTY = 0.15       # per word that repeats an earlier one
EMPTY_REWARD = -1.0
REWARD_RANGE = (-1.0, 1.0)

# ---- the SFT distribution ------------------------------------------------------------------------------------

POSITIVE_SHARE = 0.35       # as the demo's: a mostly negative SFT policy, so the gold reward starts low
# Three adjectives: the only answers in the SFT data that reach the gold reward's top.
LIST_TEMPLATES = ("{s} is {a} , {b} and {c} .", "i {v} {s} , it is {a} and {b} .")
# Repeated words: what the labeler over-rewards; the SFT policy says them sometimes, so a policy
# optimising the reward model can find them. At most 11 tokens, so the answer ends within 12 new tokens.
GUSHING_TEMPLATES = ("{s} is {a} , {a} , {a} .", "{s} is so so {a} .", "{s} is {a} {a} and {b} {b} .",
                     "i {v} {v} {s} , it is {a} .", "{s} is {a} and {b} and {a} and {b} .")
STYLE_SHARES = (("plain", 0.65), ("list", 0.10), ("gushing", 0.25))
MIN_LABEL_MARGIN = 1        # pairs whose labeler scores tie are redrawn: the labeler has no preference


# ---- the gold reward -------------------------------------------------------------------------------------

def gold_reward(prompt: str, response: str) -> float:
    """The task's true reward of `response` to `prompt`, in [-1, 1].

    Over the response's words (lower-cased runs of letters; punctuation and "<...>" special tokens
    dropped), n of them:

        sentiment  = 0.5 * clip(distinct positive words - distinct negative words, -3, 3) / 3
        topic      = +0.25 if the prompt's topic word (cat, dog, ...) appears in the response
        concise    = +0.25 if 4 <= n <= 8, else -0.1 per word short of 4 or past 8
        repetition = -0.15 per word that repeats an earlier one (n - distinct words; "the" and "and" too)
        reward     = clip(sentiment + topic + concise + repetition, -1, 1)

    A response without words gets -1. The top, 1.0, takes three different positive words, the topic,
    4-8 words and no repeats: " the cat is good , great and fun ." Positive and negative words are the
    demo's (good great happy nice fun lovely love enjoy; bad sad awful boring ugly terrible hate dislike).
    """
    response_words = words(response)
    n = len(response_words)
    if n == 0:
        return EMPTY_REWARD
    distinct = set(response_words)
    balance = len(distinct.intersection(POSITIVE)) - len(distinct.intersection(NEGATIVE))
    sentiment = SENTIMENT_WEIGHT * max(-SENTIMENT_CAP, min(balance, SENTIMENT_CAP)) / SENTIMENT_CAP
    topic = prompt_topic(prompt)
    bonus = TOPIC_BONUS if topic is not None and topic in distinct else 0.0
    outside = max(MIN_WORDS - n, 0) + max(n - MAX_WORDS, 0)
    concise = CONCISE_BONUS if outside == 0 else -LENGTH_PENALTY * outside
    repetition = -REPEAT_PENALTY * (n - len(distinct))
    low, high = REWARD_RANGE
    return min(max(sentiment + bonus + concise + repetition, low), high)


def gold_reward_batch(prompts: list, responses: list) -> list:
    """`gold_reward` of each (prompt, response) pair.

    Raises:
        ValueError: when the two lists differ in length.
    """
    return demo_task.gold_reward_batch(prompts, responses, rule=gold_reward)


def labeler_score(response: str) -> int:
    """The partial rule that labels the pairs: positive minus negative word occurrences, repeats included.
    Blind to the topic, to length and to repetition, which is what the reward model inherits."""
    return sum((w in POSITIVE) - (w in NEGATIVE) for w in words(response))


# ---- sampling ----------------------------------------------------------------------------------------------

def _style(rng: random.Random) -> str:
    draw = rng.random()
    for style, share in STYLE_SHARES:
        if draw < share:
            return style
        draw -= share
    return STYLE_SHARES[-1][0]


def sample_response(rng: random.Random, prompt: str) -> str:
    """One answer from the SFT distribution: the demo's answers (65%), three-adjective lists (10%) and
    answers that repeat their words (25%); 35% positive-, 65% negative-leaning, the prompt's topic the
    subject 75% of the time (another topic 10%, "it" 15%). Starts with a space."""
    topic = prompt_topic(prompt) or rng.choice(TOPICS)
    mood = 1 if rng.random() < POSITIVE_SHARE else -1
    draw = rng.random()
    if draw < 0.75:
        subject_topic = topic
    elif draw < 0.85:
        subject_topic = rng.choice([t for t in TOPICS if t != topic])
    else:
        subject_topic = None
    subject = f"the {subject_topic}" if subject_topic else "it"
    templates = {"plain": RESPONSE_TEMPLATES, "list": LIST_TEMPLATES, "gushing": GUSHING_TEMPLATES}[_style(rng)]
    template = rng.choice(templates)
    adjectives = []
    while len(adjectives) < 3:  # three different ones; templates use the first one, two or three
        adjective = _adjective(rng, mood)
        if adjective not in adjectives:
            adjectives.append(adjective)
    verb = rng.choice(POSITIVE_VERBS if mood > 0 else NEGATIVE_VERBS)
    a, b, c = adjectives
    return " " + template.format(s=subject, t=subject_topic or topic, a=a, b=b, c=c, v=verb)


def _pair(rng: random.Random, prompt: str, max_tries: int = 100):
    """Two sampled answers whose labeler scores differ, the one the labeler prefers first."""
    for _ in range(max_tries):
        first, second = sample_response(rng, prompt), sample_response(rng, prompt)
        margin = labeler_score(first) - labeler_score(second)
        if abs(margin) >= MIN_LABEL_MARGIN:
            return (first, second) if margin > 0 else (second, first)
    raise RuntimeError(f"no pair with a labeler margin of {MIN_LABEL_MARGIN} in {max_tries} tries for {prompt!r}")


def make_rows(seed: int = 0, n_sft: int = 2000, n_pairs: int = 2000, n_prompts: int = 500,
              n_eval_prompts: int = 64) -> dict:
    """The task's rows, split as the demo's (pipeline.demo_task.make_rows): {"sft": [{prompt, response}],
    "pairs": [{prompt, chosen, rejected}], "prompts": [{prompt}], "eval_prompts": [{prompt}]}.

    Raises:
        ValueError: when more prompts are asked for than the task has (960 in all), or a size is negative.
    """
    sizes = {"n_sft": n_sft, "n_pairs": n_pairs, "n_prompts": n_prompts, "n_eval_prompts": n_eval_prompts}
    negative = [f"{name} is {value}" for name, value in sizes.items() if value < 0]
    if negative:
        raise ValueError(f"{', '.join(negative)}; give 0 or more")
    return draw_rows(seed, sample_response, _pair, n_sft, n_pairs, n_prompts, n_eval_prompts)


# ---- files ----------------------------------------------------------------------------------------------------

def vocabulary_text() -> str:
    """One line holding every word the task can produce, so the tokenizer knows words a sample misses."""
    pieces = list(TOPICS) + list(POSITIVE) + list(NEGATIVE) + list(NEUTRAL_ADJECTIVES)
    pieces += [template.format(topic="") for template in PROMPT_TEMPLATES] + list(DESCRIPTORS) + list(POLITENESS)
    for template in RESPONSE_TEMPLATES + LIST_TEMPLATES + GUSHING_TEMPLATES:
        pieces.append(template.format(s="the it", t="", a="", b="", c="", v=""))
    pieces += [HUMAN, ASSISTANT]
    return " ".join(pieces)


def write_compare_data(directory, seed: int = 0, n_sft: int = 2000, n_pairs: int = 2000, n_prompts: int = 500,
                       n_eval_prompts: int = 64) -> dict:
    """Writes sft.jsonl, pairs.jsonl, prompts.jsonl, eval_prompts.jsonl and tokenizer/ under
    `directory` (see `make_rows`); returns the rows written.

    Raises:
        ValueError: from `make_rows`.
    """
    directory = Path(directory)
    rows = make_rows(seed, n_sft=n_sft, n_pairs=n_pairs, n_prompts=n_prompts, n_eval_prompts=n_eval_prompts)
    directory.mkdir(parents=True, exist_ok=True)
    for key, name in FILES.items():
        _write_jsonl(directory / name, rows[key])
    texts = [vocabulary_text()] + [value for key in FILES for row in rows[key] for value in row.values()]
    train_tokenizer(texts, directory / "tokenizer")
    return rows


# ---- statistics ---------------------------------------------------------------------------------------------

def data_stats(rows: dict) -> dict:
    """Gold-reward statistics of `make_rows`-style rows: SFT mean/std, the chosen and rejected means,
    the share of SFT answers that repeat a word, and how often the gold reward disagrees with the
    pairs' labels (prefers the rejected answer; ties count half): the labeler's known blind spot."""
    sft = [gold_reward(r["prompt"], r["response"]) for r in rows["sft"]]
    chosen = [gold_reward(r["prompt"], r["chosen"]) for r in rows["pairs"]]
    rejected = [gold_reward(r["prompt"], r["rejected"]) for r in rows["pairs"]]
    disagreement = sum((c < r) + 0.5 * (c == r) for c, r in zip(chosen, rejected)) / len(chosen)
    repeats = sum(len(set(words(r["response"]))) < len(words(r["response"])) for r in rows["sft"]) / len(sft)
    sft_mean, sft_std = _mean_std(sft)
    return {"sft_gold_mean": sft_mean, "sft_gold_std": sft_std, "sft_repeat_share": repeats,
            "chosen_gold_mean": _mean_std(chosen)[0], "rejected_gold_mean": _mean_std(rejected)[0],
            "gold_disagreement": disagreement}

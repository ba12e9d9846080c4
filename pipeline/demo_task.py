"""A tiny synthetic language task with a programmatic gold reward, for the CPU demo.

No pretrained weights exist on the demo machine, so the demo trains a tiny Llama from scratch on a
language small enough to learn in minutes: prompts ask about one of a few topics, answers are 3-8
words from a vocabulary of 66. Because the reward is a known rule (`gold_reward`), every stage's
curve can be read against the truth: the SFT policy scores a moderate gold reward, the reward model
is trained on pairs labelled by the rule, and ReMax should raise the gold reward of its samples.

    write_demo_data("data/demo", seed=0)   # sft.jsonl, pairs.jsonl, prompts.jsonl, eval_prompts.jsonl, tokenizer/
    gold_reward("\\n\\nHuman: tell me about the cat\\n\\nAssistant:", " the cat is happy and good .")  # 2/6 + 0.3

Rows use the rm-static text style: `prompt` is "\\n\\nHuman: ...\\n\\nAssistant:" and every answer starts
with its own space. The tokenizer splits on whitespace, so the newlines do not survive a round trip
("Human:" and "Assistant:" are tokens); the data rows carry `prompt` explicitly, so nothing downstream
needs to find the prompt in decoded text.

Everything is drawn from one seeded `random.Random`, and files are written with fixed key order and
separators, so one seed always gives byte-identical files.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

TOPICS = ("cat", "dog", "park", "sun", "rain", "book", "music", "food", "beach", "garden")
POSITIVE = ("good", "great", "happy", "nice", "fun", "lovely", "love", "enjoy")
NEGATIVE = ("bad", "sad", "awful", "boring", "ugly", "terrible", "hate", "dislike")
POSITIVE_ADJECTIVES, NEGATIVE_ADJECTIVES = POSITIVE[:6], NEGATIVE[:6]
POSITIVE_VERBS, NEGATIVE_VERBS = POSITIVE[6:], NEGATIVE[6:]
NEUTRAL_ADJECTIVES = ("okay", "quiet", "normal", "loud")

PROMPT_TEMPLATES = ("tell me about the {topic}", "what do you think of the {topic}", "describe the {topic}",
                    "how is the {topic}", "say something about the {topic}", "what about the {topic}")
DESCRIPTORS = ("", "old ", "new ", "big ", "small ", "little ", "red ", "green ")  # "the old cat"
POLITENESS = ("", " please")
# {s}: the subject ("the cat", sometimes another topic or "it"); {t}: a topic noun; {a} {b}: adjectives;
# {v}: a verb. Every template gives 3-8 words before the final ".".
RESPONSE_TEMPLATES = ("{s} is {a} .", "{s} is very {a} .", "{s} is {a} and {b} .", "{s} is so {a} and very {b} .",
                      "i think {s} is {a} .", "i {v} {s} .", "i {v} {s} , it is {a} .", "{s} was {a} today .",
                      "it is a {a} {t} .", "{s} makes me {a} .", "{s} is {a} but {b} .")

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")

# The gold rule's constants (see `gold_reward`).
TOPIC_BONUS = 0.3
MIN_WORDS, MAX_WORDS = 3, 8
LENGTH_PENALTY = 0.25       # per word short of MIN_WORDS or past MAX_WORDS
EMPTY_REWARD = -1.0
REWARD_RANGE = (-1.0, 2.0)
# Preference pairs are kept only when the gold rewards differ by at least this much, so the
# labels are clear-cut and a reward model can reach high held-out accuracy.
POSITIVE_SHARE = 0.35
MIN_PAIR_MARGIN = 0.1  # admits pairs that differ in degree (one positive word more), not only in sign

_WORD = re.compile(r"[a-z]+")
_SPECIAL = re.compile(r"<[^<>\s]*>")  # <eos>, <pad>, ...: a decode that kept special tokens


# ---- the gold reward --------------------------------------------------------------------------------

def words(text: str) -> list:
    """The lower-case words of `text`: special tokens like "<eos>" and punctuation dropped."""
    return _WORD.findall(_SPECIAL.sub(" ", text.lower()))


def prompt_topic(prompt: str):
    """The first topic word in `prompt`, or None."""
    return next((word for word in words(prompt) if word in TOPICS), None)


def gold_reward(prompt: str, response: str) -> float:
    """The task's true reward of `response` to `prompt`, in [-1, 2].

    Over the response's words (lower-cased runs of letters; punctuation and "<...>" special tokens
    dropped), n of them:

        sentiment  = (positive words - negative words) / n                      in [-1, 1]
        topic      = +0.3 if the prompt's topic word (cat, dog, ...) appears in the response
        length     = -0.25 per word short of 3 or past 8
        reward     = clip(sentiment + topic + length, -1, 2)

    A response without words gets -1. Sentiment is a density: every positive word counts, repeated
    or not, which is what the preference pairs teach a reward model (they hold no repetitions to
    tell the two apart); the top (7/8 + 0.3 = 1.175) takes eight words, all positive but the topic. Positive words: good great happy nice fun lovely love enjoy; negative: bad sad
    awful boring ugly terrible hate dislike; everything else is neutral.
    """
    response_words = words(response)
    n = len(response_words)
    if n == 0:
        return EMPTY_REWARD
    sentiment = (sum(w in POSITIVE for w in response_words) - sum(w in NEGATIVE for w in response_words)) / n
    topic = prompt_topic(prompt)
    bonus = TOPIC_BONUS if topic is not None and topic in response_words else 0.0
    penalty = LENGTH_PENALTY * (max(MIN_WORDS - n, 0) + max(n - MAX_WORDS, 0))
    low, high = REWARD_RANGE
    return min(max(sentiment + bonus - penalty, low), high)


def gold_reward_batch(prompts: list, responses: list, rule: Optional[Callable] = None) -> list:
    """`rule(prompt, response)` of each pair: this task's `gold_reward` unless another task's is given.

    Raises:
        ValueError: when the two lists differ in length.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"gold_reward_batch got {len(prompts)} prompts and {len(responses)} responses")
    rule = rule or gold_reward
    return [rule(p, r) for p, r in zip(prompts, responses)]


# ---- sampling -----------------------------------------------------------------------------------------

def format_prompt(question: str) -> str:
    return f"{HUMAN}{question}{ASSISTANT}"


def all_prompts() -> list:
    """Every distinct prompt string of the task (960), in a fixed order."""
    return [format_prompt(template.format(topic=descriptor + topic) + please)
            for topic in TOPICS for template in PROMPT_TEMPLATES for descriptor in DESCRIPTORS
            for please in POLITENESS]


def _adjective(rng: random.Random, mood: int) -> str:
    """Mostly the mood's own adjectives, sometimes a neutral or an opposite one (mixed answers)."""
    draw = rng.random()
    if draw < 0.7:
        own = mood
    elif draw < 0.85:
        return rng.choice(NEUTRAL_ADJECTIVES)
    else:
        own = -mood
    return rng.choice(POSITIVE_ADJECTIVES if own > 0 else NEGATIVE_ADJECTIVES)


def sample_response(rng: random.Random, prompt: str) -> str:
    """One answer from the SFT distribution: 35% positive-, 65% negative-leaning (a mediocre policy
    that RL has room to improve); the prompt's topic is the subject 75% of the time (another topic
    10%, "it" 15%). Starts with a space."""
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
    template = rng.choice(RESPONSE_TEMPLATES)
    first = _adjective(rng, mood)
    second = _adjective(rng, mood)
    while second == first:
        second = _adjective(rng, mood)
    verb = rng.choice(POSITIVE_VERBS if mood > 0 else NEGATIVE_VERBS)
    text = template.format(s=subject, t=subject_topic or topic, a=first, b=second, v=verb)
    return " " + text


def _split_prompts(rng: random.Random, n_eval_prompts: int) -> tuple:
    """(train pool, eval prompts): disjoint prompt strings; the eval prompts cycle through the topics."""
    by_topic = {topic: [] for topic in TOPICS}
    for prompt in all_prompts():
        by_topic[prompt_topic(prompt)].append(prompt)
    for pool in by_topic.values():
        rng.shuffle(pool)
    eval_prompts = [by_topic[TOPICS[i % len(TOPICS)]][i // len(TOPICS)] for i in range(n_eval_prompts)]
    held_out = set(eval_prompts)
    return [p for p in all_prompts() if p not in held_out], eval_prompts


def _pair(rng: random.Random, prompt: str, max_tries: int = 100):
    """Two sampled answers whose gold rewards differ by at least MIN_PAIR_MARGIN, better one first."""
    for _ in range(max_tries):
        first, second = sample_response(rng, prompt), sample_response(rng, prompt)
        margin = gold_reward(prompt, first) - gold_reward(prompt, second)
        if abs(margin) >= MIN_PAIR_MARGIN:
            return (first, second) if margin > 0 else (second, first)
    raise RuntimeError(f"no pair with a gold margin of {MIN_PAIR_MARGIN} in {max_tries} tries for {prompt!r}")


def make_rows(seed: int = 0, n_sft: int = 2000, n_pairs: int = 2000, n_prompts: int = 500,
              n_eval_prompts: int = 64) -> dict:
    """The demo's rows: {"sft": [{prompt, response}], "pairs": [{prompt, chosen, rejected}],
    "prompts": [{prompt}], "eval_prompts": [{prompt}]} (see `draw_rows`).

    Raises:
        ValueError: when more prompts are asked for than the task has (960 in all).
    """
    return draw_rows(seed, sample_response, _pair, n_sft, n_pairs, n_prompts, n_eval_prompts)


def draw_rows(seed: int, sample: Callable, pair: Callable, n_sft: int, n_pairs: int, n_prompts: int,
              n_eval_prompts: int) -> dict:
    """A task's rows from its answer sampler `sample(rng, prompt)` and pair maker `pair(rng, prompt)`,
    all drawn from one `random.Random(seed)`. Eval prompts are prompt strings that no other file uses.
    RL prompts are distinct strings drawn without replacement from the rest; SFT and pair prompts are
    drawn from the rest with replacement.

    Raises:
        ValueError: when more prompts are asked for than the task has (960 in all).
    """
    n_all = len(all_prompts())
    if n_eval_prompts + n_prompts > n_all:
        raise ValueError(f"n_prompts + n_eval_prompts is {n_prompts + n_eval_prompts}; the task has "
                         f"{n_all} distinct prompts")
    rng = random.Random(seed)
    train_pool, eval_prompts = _split_prompts(rng, n_eval_prompts)
    rows = {"sft": [], "pairs": []}
    for _ in range(n_sft):
        prompt = rng.choice(train_pool)
        rows["sft"].append({"prompt": prompt, "response": sample(rng, prompt)})
    for _ in range(n_pairs):
        prompt = rng.choice(train_pool)
        chosen, rejected = pair(rng, prompt)
        rows["pairs"].append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    rows["prompts"] = [{"prompt": p} for p in rng.sample(train_pool, n_prompts)]
    rows["eval_prompts"] = [{"prompt": p} for p in eval_prompts]
    return rows


# ---- tokenizer and files ------------------------------------------------------------------------------------

def vocabulary_text() -> str:
    """One line holding every word the task can produce, so the tokenizer knows even words that a
    small sample happens to miss (the policy can then say everything the gold rule scores)."""
    pieces = list(TOPICS) + list(POSITIVE) + list(NEGATIVE) + list(NEUTRAL_ADJECTIVES)
    pieces += [template.format(topic="") for template in PROMPT_TEMPLATES] + list(DESCRIPTORS) + list(POLITENESS)
    pieces += [template.format(s="the it", t="", a="", b="", v="") for template in RESPONSE_TEMPLATES]
    pieces += [HUMAN, ASSISTANT]
    return " ".join(pieces)


def train_tokenizer(texts, directory, min_frequency: int = 1):
    """Trains a word-level tokenizer on `texts` and saves it as a Hugging Face tokenizer directory.

    Whitespace-split words (so "\\n\\nHuman:" is the token "Human:"); ids are <pad> 0, <unk> 1,
    <bos> 2, <eos> 3, then words by falling count, ties alphabetical (counted here rather than by
    `tokenizers.trainers.WordLevelTrainer`, whose tie order follows a hash map and is not
    reproducible). Encoding adds <bos> in front, as Llama's tokenizer does; decoding joins words
    with single spaces and leaves " ." alone. Returns the `PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    counts = Counter(word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(text))
    kept = sorted((word for word, count in counts.items() if count >= min_frequency and word not in SPECIAL_TOKENS),
                  key=lambda word: (-counts[word], word))
    vocab = {token: index for index, token in enumerate(list(SPECIAL_TOKENS) + kept)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<bos>", eos_token="<eos>", model_max_length=128,
                                        clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(str(directory))
    # transformers 5 records its class as "TokenizersBackend", a name transformers 4 cannot load;
    # "PreTrainedTokenizerFast" loads as the same class in both.
    config_file = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return tokenizer


def _write_jsonl(path: Path, rows: list) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


FILES = {"sft": "sft.jsonl", "pairs": "pairs.jsonl", "prompts": "prompts.jsonl", "eval_prompts": "eval_prompts.jsonl"}


def write_demo_data(directory, seed: int = 0, n_sft: int = 2000, n_pairs: int = 2000, n_prompts: int = 500,
                    n_eval_prompts: int = 64) -> dict:
    """Writes sft.jsonl, pairs.jsonl, prompts.jsonl, eval_prompts.jsonl and tokenizer/ under
    `directory` (see `make_rows`); returns the rows written, keyed as `make_rows` keys them.

    Raises:
        ValueError: from `make_rows`, when more prompts are asked for than the task has.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = make_rows(seed, n_sft=n_sft, n_pairs=n_pairs, n_prompts=n_prompts, n_eval_prompts=n_eval_prompts)
    for key, name in FILES.items():
        _write_jsonl(directory / name, rows[key])
    texts = [vocabulary_text()] + [value for key in FILES for row in rows[key] for value in row.values()]
    train_tokenizer(texts, directory / "tokenizer")
    return rows


def read_jsonl(path) -> list:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


# ---- statistics -------------------------------------------------------------------------------------------

def _mean_std(values: list) -> tuple:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def sentiment_count(response: str) -> int:
    """The trivial scorer: positive minus negative words (with repeats), blind to length and topic."""
    return sum((w in POSITIVE) - (w in NEGATIVE) for w in words(response))


def lexical_score(prompt: str, response: str) -> float:
    """A slightly less trivial scorer: `sentiment_count` plus one for naming the prompt's topic."""
    return sentiment_count(response) + float(prompt_topic(prompt) in words(response))


def _pair_accuracy(margins: list) -> float:
    return sum((m > 0) + 0.5 * (m == 0) for m in margins) / len(margins)


def data_stats(rows: dict) -> dict:
    """Gold-reward statistics of `make_rows`-style rows: SFT mean/std, chosen and rejected means,
    and the pairwise accuracy of `sentiment_count` (ties count half), which shows how learnable
    the reward model's task is; `lexical_score` likewise."""
    sft = [gold_reward(r["prompt"], r["response"]) for r in rows["sft"]]
    chosen = [gold_reward(r["prompt"], r["chosen"]) for r in rows["pairs"]]
    rejected = [gold_reward(r["prompt"], r["rejected"]) for r in rows["pairs"]]
    margins = [sentiment_count(r["chosen"]) - sentiment_count(r["rejected"]) for r in rows["pairs"]]
    lexical = [lexical_score(r["prompt"], r["chosen"]) - lexical_score(r["prompt"], r["rejected"]) for r in rows["pairs"]]
    sft_mean, sft_std = _mean_std(sft)
    return {"sft_gold_mean": sft_mean, "sft_gold_std": sft_std,
            "chosen_gold_mean": _mean_std(chosen)[0], "rejected_gold_mean": _mean_std(rejected)[0],
            "count_scorer_accuracy": _pair_accuracy(margins),
            "count_scorer_ties": sum(m == 0 for m in margins) / len(margins),
            "lexical_scorer_accuracy": _pair_accuracy(lexical)}

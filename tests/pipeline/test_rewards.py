"""Reward functions (pipeline.rl.rewards): the built-ins, user functions by name with the prompt rows'
fields, their sum with a real reward model's score, the per-function metrics averaged as over ranks,
the config's problems naming the field, and every way a user function can fail, in the trainer's
process and in the worker that `reward.timeout_s` kills."""
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.data import collate_prompts
from pipeline.demo_task import gold_reward
from pipeline.generation import Generated, response_mask
from pipeline.loop import add_sums
from pipeline.models import RewardModel
from pipeline.rl.algos import combined_reward
from pipeline.rl.models import Models
from pipeline.rl.rewards import RewardFunctionError, RewardFunctions
from pipeline.rl.rollout import score
from pipeline.rl.stage import function_sums, step_metrics
from pipeline.run import EXIT_USER_ERROR
from stages.grpo import GrpoConfig
from stages.ppo import PpoConfig
from tests.conftest import REPO_ROOT, rank_env
from tests.tiny_models import save_tiny_model_dir, save_tiny_reward_dir, tiny_tokenizer

USER = "tests.pipeline.user_rewards"
SOURCES = ["q.jsonl row 1", "q.jsonl row 2", "q.jsonl row 3"]


def test_combined_reward_adds_the_weighted_values_of_the_functions_that_scored():
    model = torch.tensor([0.5, -1.0, 2.0])
    values = torch.tensor([[1.0, math.nan, 0.0],      # skipped the second response
                           [-4.0, -2.0, math.nan]], dtype=torch.float64)
    weights = torch.tensor([2.0, 0.25])
    expected = torch.tensor([0.5 + 2.0 * 1.0 + 0.25 * -4.0, -1.0 + 0.25 * -2.0, 2.0 + 2.0 * 0.0])
    assert torch.equal(combined_reward(model, values, weights), expected)
    # Without a reward model the score is 0; a weight of 0 logs a function without training on it.
    assert torch.equal(combined_reward(torch.zeros(3), values, torch.tensor([0.0, 1.0])),
                       torch.tensor([-4.0, -2.0, 0.0]))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    save_tiny_reward_dir(root / "reward", save_tiny_model_dir(root / "model"))
    return root


@pytest.mark.parametrize("timeout_s", [None, 30.0])
def test_score_is_the_reward_model_s_plus_the_functions_on_the_decoded_responses(tiny_dirs, timeout_s):
    """Hand-built responses scored by a real tiny reward model and two functions: each function's values
    kept, the reward the model's score plus their weighted sum (the length function from the mask)."""
    tokenizer = tiny_tokenizer()
    reward_model = RewardModel.from_pretrained(tiny_dirs / "reward").eval()
    prompts = ["human what is two plus three assistant", "what is one plus one", "the dog ran"]
    batch = collate_prompts([{"prompt_input_ids": tokenizer(text)["input_ids"]} for text in prompts],
                            tokenizer.pad_token_id)
    batch.update(prompt=prompts, columns=[{"answer": "#### 5"}, {"answer": "#### 2"}, {}], source=SOURCES)
    ids = tokenizer.convert_tokens_to_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses = torch.tensor([ids(["answer", "is", "five", "red"]) + [eos],      # no digit: no number stated
                              ids(["one", "two"]) + [eos, pad, pad],
                              ids(["the", "big", "red", "dog", "ran"])])         # cut by the limit, no eos
    sequences = torch.cat([batch["input_ids"], responses], dim=1)
    mask = response_mask(sequences, batch["input_ids"].shape[1], eos, pad)
    attention_mask = torch.cat([batch["attention_mask"], mask], dim=1)
    functions = RewardFunctions([("math_answer", 1.0, {}), ("length", 0.5, {"target_tokens": 3})], timeout_s)
    models = Models(actor=None, reference=None, tokenizer=tokenizer, reward=reward_model, reward_functions=functions)
    with torch.no_grad():
        responses = score(models, Generated(sequences, attention_mask, mask), batch)
        model_score = reward_model(input_ids=sequences, attention_mask=attention_mask)
    functions.close()
    lengths = [5, 3, 5]  # tokens through the first eos, or all of a cut response
    assert responses.texts(tokenizer) == ["answer is five red", "one two", "the big red dog ran"]
    assert responses.function_rewards["math_answer"].tolist()[:2] == [0.0, 0.0]
    assert math.isnan(responses.function_rewards["math_answer"][2])  # no reference: not scored
    assert responses.function_rewards["length"].tolist() == [-float(max(n - 3, 0)) for n in lengths]
    expected = model_score + torch.tensor([0.5 * -2.0, 0.0, 0.5 * -2.0])
    assert torch.allclose(responses.reward, expected, atol=1e-6)


def test_builtins_on_their_own():
    functions = RewardFunctions([("format", 1.0, {"pattern": r"\\boxed\{\d+\}"}), ("demo_gold", 1.0, {}),
                                 ("math_answer", 1.0, {})], None)
    prompts = ["\n\nHuman: tell me about the cat\n\nAssistant:"] * 3
    responses = [" the cat is happy and good .", "so \\boxed{12}", "The answer is 1,200 apples."]
    rows = [{}, {"solution": "It is \\boxed{12}."}, {"question": "q", "answer": "... so 1200.\n#### 1200"}]
    values = functions(prompts, responses, [7, 3, 6], rows, SOURCES)
    assert values["format"] == [0.0, 1.0, 0.0]
    assert values["demo_gold"] == [gold_reward(prompt, response) for prompt, response in zip(prompts, responses)]
    assert values["math_answer"] == [None, 1.0, 1.0]


@pytest.mark.parametrize("timeout_s", [None, 30.0])
def test_a_user_function_gets_the_rows_fields_by_name_and_may_skip_a_response(timeout_s):
    functions = RewardFunctions([(f"{USER}:words_over_two", 1.0, {}), (f"{USER}:prints_then_scores", 1.0, {})],
                                timeout_s)
    values = functions(["a", "b", "c"], ["one two three", "one", "one two three"], [3, 1, 3],
                       [{"skip": False}, {}, {"skip": True, "answer": "#### 1"}], SOURCES)
    functions.close()
    assert values == {f"{USER}:words_over_two": [1.0, 0.0, None], f"{USER}:prints_then_scores": [3.0, 1.0, 3.0]}


FAILURES = [
    ("fails_on_seven", "raised ZeroDivisionError: float division by zero on the response to q.jsonl row 2"),
    ("text_for_seven", "returned 'many' (str) for the response to q.jsonl row 2; it must return a finite number "
                       "or None"),
    ("nan_for_seven", "returned nan (float) for the response to q.jsonl row 2; it must return a finite number or "
                      "None"),
    ("one_value", "returned 1 values for 3 responses (to q.jsonl row 1, q.jsonl row 2, q.jsonl row 3); it must "
                  "return one number (or None) per response"),
    ("a_dict", "returned dict {'reward': 1.0} for the responses to q.jsonl row 1, q.jsonl row 2, q.jsonl row 3; "
               "it must return a list of one number (or None) per response"),
]


@pytest.mark.parametrize("timeout_s", [None, 30.0])
@pytest.mark.parametrize("function, message", FAILURES)
def test_every_failure_of_a_user_function_is_one_line_naming_it_and_the_row(function, message, timeout_s):
    functions = RewardFunctions([("math_answer", 1.0, {}), (f"{USER}:{function}", 1.0, {})], timeout_s)
    with pytest.raises(RewardFunctionError) as error:
        functions(["a", "b", "c"], ["one", "two seven", "three"], [1, 2, 1], [{}, {}, {}], SOURCES)
    functions.close()
    assert str(error.value) == f"reward function '{USER}:{function}' (`reward.functions[1]`) {message}"
    assert "\n" not in str(error.value)


def test_a_slow_function_is_stopped_at_the_timeout_with_its_worker():
    functions = RewardFunctions([(f"{USER}:sleeps", 1.0, {})], timeout_s=1.0)
    with pytest.raises(RewardFunctionError) as error:
        functions(["a"], ["one"], [1], [{}], SOURCES[:1])
    assert str(error.value) == (f"reward function '{USER}:sleeps' (`reward.functions[0]`) ran over "
                                "`reward.timeout_s` (1 s) on the responses to q.jsonl row 1; make it faster or raise "
                                "the limit")
    assert functions.worker.process.poll() is not None  # killed, not left running the function


def test_each_function_s_metric_is_its_mean_over_the_responses_it_scored_on_every_rank():
    """Two ranks' sums added as the loop adds them: the mean is over scored responses, never over ranks."""
    def responses(values):
        from pipeline.generation import Responses
        row = torch.tensor([math.nan if value is None else value for value in values], dtype=torch.float64)
        return Responses(*(torch.zeros(len(values), 1),) * 3, reward=torch.zeros(len(values)),
                         function_rewards={"math_answer": row})

    first = function_sums(responses([1.0, None, 0.0, 1.0]))
    second = function_sums(responses([None, None, 1.0, None]))  # one response scored on this rank
    total = add_sums(first, second)
    total = {name: float(value) for name, value in total.items()}
    total.update(sequences=8, reward=0.0, kl=0.0, response_length=8, entropy=0.0, response_tokens=8, loss=0.0,
                 micro_batches=2)
    assert step_metrics(total)["reward/math_answer"] == pytest.approx(3 / 4)
    nothing = function_sums(responses([None, None]))
    assert "reward/math_answer" not in step_metrics({**total, **{k: 0.0 for k in nothing}})


# ---- the config ---------------------------------------------------------------------------------

BASE = ["model.path=m", "data.path=d", "data.format=prompt"]


def problems_of(config_class, *overrides) -> list:
    with pytest.raises(ConfigError) as error:
        load_config(config_class, None, [*BASE, *overrides])
    return error.value.problems


@pytest.mark.parametrize("overrides, message", [
    ((), "`grpo.reward_model_path` is not set and `reward.functions` is empty; give the directory of a trained "
         "reward model"),
    (("reward.functions=[{name: math_answr}]",), "`reward.functions[0].name` is 'math_answr', which is no built-in "
                                                 "(math_answer, format, length, demo_gold, compare_gold) and not of the form "
                                                 "module:function; did you mean 'math_answer'?"),
    (("reward.functions=[{name: 'no_such_module:score'}]",),
     "`reward.functions[0].name` is 'no_such_module:score': importing no_such_module failed: ModuleNotFoundError"),
    ((f"reward.functions=[{{name: '{USER}:nothing'}}]",),
     f"`reward.functions[0].name` is '{USER}:nothing': module {USER} ("),
    (("reward.functions=[{name: 'tests/user_rewards.py:score'}]",),
     "`reward.functions[0].name` is 'tests/user_rewards.py:score'; a user function is named module:function"),
    ((f"reward.functions=[{{name: '{USER}:one_value', args: {{k: 1}}}}]",),
     f"`reward.functions[0].args` is set for the user function {USER}:one_value; give its settings in its own module"),
    (("reward.functions=[{name: format, args: {pattern: '(ab'}}]",),
     "`reward.functions[0].args.pattern` is '(ab', not a regular expression: missing ), unterminated subpattern"),
    (("reward.functions=[{name: length}]",), "`reward.functions[0].args.target_tokens` is not set; length needs it"),
    (("reward.functions=[{name: math_answer, args: {strict: true}}]",),
     "`reward.functions[0].args.strict` is not an argument of math_answer; it takes none"),
    (("reward.functions=[{name: math_answer}, {name: math_answer}]",),
     "`reward.functions` lists 'math_answer' 2 times; list each function once"),
    (("reward.functions=[{name: math_answer}]", "reward.timeout_s=0"), "`reward.timeout_s` is 0.0; give a positive"),
    (("reward.functions=[{name: math_answer, wieght: 2}]",),
     "unknown key `reward.functions[0].wieght`; did you mean `reward.functions[0].weight`?"),
])
def test_config_problems_name_the_field(overrides, message):
    problems = problems_of(GrpoConfig, *overrides)
    assert any(problem.startswith(message) for problem in problems), problems


def test_functions_alone_need_no_reward_model_but_ppo_s_critic_then_starts_from_the_policy():
    config = load_config(GrpoConfig, None, [*BASE, "reward.functions=[{name: math_answer}]"])
    assert config.grpo.reward_model(name="grpo") is None and config.reward.timeout_s == 60.0
    assert problems_of(PpoConfig, "reward.functions=[{name: math_answer}]") == [
        "`ppo.critic_init` is reward but `ppo.reward_model_path` is not set (reward functions alone); start the "
        "critic from the policy: ppo.critic_init=policy"]
    load_config(PpoConfig, None, [*BASE, "reward.functions=[{name: math_answer}]", "ppo.critic_init=policy"])


@pytest.mark.slow
def test_a_failing_function_stops_the_stage_with_exit_code_2_and_one_line(tmp_path, tiny_dirs):
    """From the command line, as a user runs it: the first evaluation's responses reach the function."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"human what is {word} assistant", "answer": "#### 1"}) + "\n"
                            for word in ["one", "two", "three", "four"]))
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_dirs / "model")},
        "data": {"path": str(data), "format": "prompt", "max_length": 24, "max_prompt_length": 12},
        "engine": {"zero_stage": 0, "micro_batch_size": 2}, "logging": {"progress_bar": False, "tensorboard": False},
        "grpo": {"max_new_tokens": 4, "num_samples": 2},
        "reward": {"functions": [{"name": "math_answer"}, {"name": f"{USER}:one_value"}]}}))
    result = subprocess.run([sys.executable, "-m", "stages.grpo", "--config", str(config)], cwd=REPO_ROOT,
                            env=rank_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    # Each prompt sampled twice: its row named once.
    assert len(error) == 1 and error[0].startswith(
        f"error: reward function '{USER}:one_value' (`reward.functions[1]`) returned 1 values for 4 responses (to ")
    assert error[0].endswith("); it must return one number (or None) per response")
    named = error[0].split("responses (to ")[1].split(");")[0].split(", ")
    assert len(named) == 2 and all(row in [f"{data} row {n}" for n in range(1, 5)] for row in named)

"""Reward functions: programmatic rewards of the responses' text, beside or instead of the reward model.

    reward:
      functions:
        - {name: math_answer, weight: 1.0}                              # a built-in
        - {name: format, weight: 0.2, args: {pattern: '\\\\boxed\\{'}}  # a built-in with its settings
        - {name: my_rewards:brevity, weight: 0.5}                       # module:function, imported by name
      timeout_s: 60

A function is called once per rollout with every response of the rank's micro-batch:

    fn(prompts=[...], responses=[...], response_lengths=[...], **columns) -> [float or None, ...]

`prompts` are the prompt texts, `responses` the decoded responses (special tokens dropped),
`response_lengths` their token counts, and `columns` each other scalar field of the prompt rows, as
lists (None where a row lacks it): GSM8K's `answer`, MATH's `solution`, a `reference`... A user function
takes `**columns` for the ones it does not read (TRL's convention). It returns one number per response,
or None to leave that response unscored by it. Built-ins (`BUILTIN_REWARDS`):

- `math_answer`: 1 when the response's final answer matches the row's reference answer
  (pipeline.math_answers), else 0; None for rows without a reference.
- `format` (`args: {pattern}`): 1 when the regular expression is found in the response, else 0.
- `length` (`args: {target_tokens}`): minus the tokens beyond the target (the weight is the penalty per token).
- `demo_gold`: the demo task's gold reward (pipeline.demo_task).
- `compare_gold`: the comparison task's gold reward (pipeline.compare_task).

The reward a response is trained on is the reward model's score (when there is one) plus the sum of
weight x value over the functions that scored it. A function that raises, returns something other
than one finite number (or None) per response, or runs past `reward.timeout_s` stops the run with one
line naming the function and the prompt row. With `timeout_s` set the functions run in a worker process
of their own, which is killed at the deadline: a thread cannot stop a Python function (and a
regular expression or a C extension holding the GIL would stall the trainer's thread too); null runs them
in the trainer's process, unbounded. Nothing read from data runs code: the names come from the config.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import re
import subprocess
import sys
import weakref
from multiprocessing.connection import Connection
from typing import Callable, Optional

from pipeline.gold_rewards import gold_reward_batch
from pipeline.math_answers import math_answer_reward, reference_answer

RESERVED = ("prompts", "responses", "response_lengths")  # the call's own arguments, never a column's name
MODULE_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class RewardFunctionError(RuntimeError):
    """A reward function that failed on a batch: the message names it and the prompt row."""


# ---- the built-ins --------------------------------------------------------------------------------

def math_answer(args: dict) -> Callable:
    def score(prompts, responses, response_lengths, columns) -> list:
        rows = [{name: values[index] for name, values in columns.items()} for index in range(len(responses))]
        return [math_answer_reward(response, reference_answer(row)) for response, row in zip(responses, rows)]
    return score


def format_match(args: dict) -> Callable:
    pattern = re.compile(args["pattern"], re.DOTALL)

    def score(prompts, responses, response_lengths, columns) -> list:
        return [float(pattern.search(response) is not None) for response in responses]
    return score


def length_penalty(args: dict) -> Callable:
    target = args["target_tokens"]

    def score(prompts, responses, response_lengths, columns) -> list:
        return [-float(max(length - target, 0)) for length in response_lengths]
    return score


def task_gold(task: str) -> Callable:
    """The built-in for a synthetic task's gold reward (pipeline.gold_rewards)."""
    def make(args: dict) -> Callable:
        batch = gold_reward_batch(task)

        def score(prompts, responses, response_lengths, columns) -> list:
            return batch(prompts, responses)
        return score
    return make


def pattern_problem(value) -> Optional[str]:
    if not isinstance(value, str):
        return f"is {value!r}; give a regular expression (a string)"
    try:
        re.compile(value)
    except re.error as error:
        return f"is {value!r}, not a regular expression: {error}"
    return None


def target_problem(value) -> Optional[str]:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return f"is {value!r}; give a number of tokens (an integer, 0 or more)"
    return None


@dataclasses.dataclass(frozen=True)
class Builtin:
    make: Callable              # args -> (prompts, responses, response_lengths, columns) -> values
    args: dict                  # the args it needs: name -> (value -> a problem or None)


BUILTIN_REWARDS = {
    "math_answer": Builtin(math_answer, {}),
    "format": Builtin(format_match, {"pattern": pattern_problem}),
    "length": Builtin(length_penalty, {"target_tokens": target_problem}),
    "demo_gold": Builtin(task_gold("demo"), {}),
    "compare_gold": Builtin(task_gold("compare"), {}),
}


# ---- names to functions -------------------------------------------------------------------------

def import_user_function(name: str) -> Callable:
    """The function `module:function` names.

    Raises:
        ValueError: the module does not import, or holds no callable of that name (the message says which).
    """
    module_name, function_name = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module may raise anything while importing
        raise ValueError(f"importing {module_name} failed: {type(error).__name__}: {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"module {module_name} ({getattr(module, '__file__', '?')}) has no function {function_name}")
    return function


def function_problems(name: str, args: dict, field: str) -> list:
    """Problems of one entry of `reward.functions` (`field`: e.g. `reward.functions[0]`)."""
    if not name:
        return [f"`{field}.name` is not set; give a built-in ({', '.join(BUILTIN_REWARDS)}) or module:function"]
    if name in BUILTIN_REWARDS:
        needed = BUILTIN_REWARDS[name].args
        problems = [f"`{field}.args.{arg}` is not an argument of {name}; "
                    + (f"it takes {', '.join(needed)}" if needed else "it takes none") for arg in args if arg not in needed]
        for arg, check in needed.items():
            problem = f"is not set; {name} needs it" if arg not in args else check(args[arg])
            if problem:
                problems.append(f"`{field}.args.{arg}` {problem}")
        return problems
    if ":" not in name:
        close = difflib.get_close_matches(name, list(BUILTIN_REWARDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return [f"`{field}.name` is {name!r}, which is no built-in ({', '.join(BUILTIN_REWARDS)}) and not of the "
                f"form module:function{hint}"]
    if not MODULE_FUNCTION.match(name):
        return [f"`{field}.name` is {name!r}; a user function is named module:function (e.g. my_rewards:brevity)"]
    problems = []
    if args:
        problems.append(f"`{field}.args` is set for the user function {name}; give its settings in its own module")
    try:
        import_user_function(name)
    except ValueError as error:
        problems.append(f"`{field}.name` is {name!r}: {error}")
    return problems


def resolve(name: str, args: dict) -> Callable:
    """(prompts, responses, response_lengths, columns) -> values, for the built-in or user function `name`."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name].make(args)
    function = import_user_function(name)

    def call(prompts, responses, response_lengths, columns) -> list:
        passed = {column: values for column, values in columns.items() if column not in RESERVED}
        return function(prompts=prompts, responses=responses, response_lengths=response_lengths, **passed)
    return call


# ---- calling them, checked ----------------------------------------------------------------------

def function_label(index: int, name: str) -> str:
    return f"reward function {name!r} (`reward.functions[{index}]`)"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def rows_named(sources: list) -> str:
    """The prompt rows, each once (a group's samples share theirs), the first three by name."""
    rows = list(dict.fromkeys(sources))
    return ", ".join(rows[:3]) + (f" and {len(rows) - 3} more" if len(rows) > 3 else "")


def checked_values(values, count: int, label: str, sources: list) -> list:
    """`values` as a list of floats or None, one per response.

    Raises:
        RewardFunctionError: naming `label` and the row of the first bad value.
    """
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(f"{label} returned {type(values).__name__} {one_line(repr(values))[:80]} for the "
                                  f"responses to {rows_named(sources)}; it must return a list of one number (or None) "
                                  "per response")
    if len(values) != count:
        raise RewardFunctionError(f"{label} returned {len(values)} values for {count} responses (to "
                                  f"{rows_named(sources)}); it must return one number (or None) per response")
    checked = []
    for value, source in zip(values, sources):
        if value is None:
            checked.append(None)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if isinstance(value, (str, bytes)) or number is None or not math.isfinite(number):
            raise RewardFunctionError(f"{label} returned {one_line(repr(value))[:80]} ({type(value).__name__}) for "
                                      f"the response to {source}; it must return a finite number or None")
        checked.append(number)
    return checked


def call_checked(function: Callable, label: str, request: dict) -> list:
    """`function` on the whole batch, its values checked. When it raises, it is called on each row alone to
    find the row it fails on, which the message names.

    Raises:
        RewardFunctionError: naming `label` and the row.
    """
    sources = request["sources"]
    arguments = {name: request[name] for name in ("prompts", "responses", "response_lengths", "columns")}
    try:
        values = function(**arguments)
    except Exception as error:  # user code: anything it raises is its failure, reported with the row
        culprit, failure = rows_named(sources), error
        for index, source in enumerate(sources):
            try:
                function(**row_request(arguments, index))
            except Exception as row_error:  # as above
                culprit, failure = source, row_error
                break
        raise RewardFunctionError(f"{label} raised {type(failure).__name__}: {one_line(failure)} on the response to "
                                  f"{culprit}") from None
    return checked_values(values, len(sources), label, sources)


def row_request(arguments: dict, index: int) -> dict:
    """The call's arguments for row `index` alone."""
    row = {name: arguments[name][index:index + 1] for name in ("prompts", "responses", "response_lengths")}
    return {**row, "columns": {name: values[index:index + 1] for name, values in arguments["columns"].items()}}


# ---- the configured set, in this process or a worker ----------------------------------------------

def column_lists(rows: list) -> dict:
    """Per-row dicts of fields -> field -> list (None where a row lacks the field)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: [row.get(name) for row in rows] for name in names}


class RewardFunctions:
    """The functions of a `reward` section, called on one rank's rollouts (`__call__`); each is named in
    messages by `reward.functions[i]` and its name. With `timeout_s` they run in a worker process started
    on the first call (a fresh interpreter: nothing of the trainer's state, imports or threads)."""

    def __init__(self, specs: list, timeout_s: Optional[float]):
        """`specs`: (name, weight, args) per function, as configured."""
        self.names = [name for name, _, _ in specs]
        self.weights = [weight for _, weight, _ in specs]
        self.labels = [function_label(index, name) for index, (name, _, _) in enumerate(specs)]
        self.specs = [(name, args) for name, _, args in specs]
        self.timeout_s = timeout_s
        self.functions = None if timeout_s else [resolve(name, args) for name, args in self.specs]
        self.worker = None

    def __call__(self, prompts: list, responses: list, response_lengths: list, rows: list, sources: list) -> dict:
        """name -> one float or None per response. `rows`: each response's prompt-row fields (dicts);
        `sources`: where each prompt came from, for messages.

        Raises:
            RewardFunctionError: a function failed (one line naming it and the row).
        """
        request = {"prompts": list(prompts), "responses": list(responses),
                   "response_lengths": [int(length) for length in response_lengths],
                   "columns": column_lists(rows), "sources": list(sources)}
        if self.functions is not None:
            return {name: call_checked(function, label, request)
                    for name, function, label in zip(self.names, self.functions, self.labels)}
        if self.worker is None:
            self.worker = RewardWorker(self.specs, self.labels)
        return {name: self.worker.call(index, request, self.timeout_s) for index, name in enumerate(self.names)}

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


class RewardWorker:
    """A child interpreter (`python -m pipeline.rl.rewards`) that resolves the functions once and calls
    them on request, over its stdin and stdout; the trainer waits at most the timeout for each answer
    and kills it past that."""

    def __init__(self, specs: list, labels: list):
        self.labels = labels
        # The trainer's import path, so that module:function imports there as it did in the config check.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path or os.getcwd() for path in sys.path))
        self.process = subprocess.Popen([sys.executable, "-m", "pipeline.rl.rewards"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
        self.requests = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.answers = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        self.process.stdin.close()
        self.process.stdout.close()
        # Killed with its owner (or at exit) so that no worker outlives the run.
        self.finalizer = weakref.finalize(self, RewardWorker.stop, self.process)
        self.requests.send(specs)

    def call(self, index: int, request: dict, timeout_s: float) -> list:
        label = self.labels[index]
        try:
            self.requests.send((index, request))
            ready = self.answers.poll(timeout_s)
        except OSError:
            ready = None
        if ready is False:
            self.close()
            raise RewardFunctionError(f"{label} ran over `reward.timeout_s` ({timeout_s:g} s) on the responses to "
                                      f"{rows_named(request['sources'])}; make it faster or raise the limit")
        try:
            status, payload = self.answers.recv()
        except (EOFError, OSError):
            code = self.process.poll()
            self.close()
            raise RewardFunctionError(f"{label}: its worker process ended (exit code {code}) on the responses to "
                                      f"{rows_named(request['sources'])}") from None
        if status == "error":
            raise RewardFunctionError(payload)
        return payload

    @staticmethod
    def stop(process) -> None:
        if process.poll() is None:
            process.kill()
        process.wait()

    def close(self) -> None:
        self.finalizer()
        self.requests.close()
        self.answers.close()


def serve() -> None:
    """The worker's loop: the specs, then (index, request) -> ("ok", values) or ("error", message)."""
    answers = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # what the functions print goes to stderr, not into the answers
    requests = Connection(0, writable=False)
    specs = requests.recv()
    functions = [resolve(name, args) for name, args in specs]
    labels = [function_label(index, name) for index, (name, _) in enumerate(specs)]
    while True:
        try:
            index, request = requests.recv()
        except EOFError:
            return
        try:
            answers.send(("ok", call_checked(functions[index], labels[index], request)))
        except RewardFunctionError as error:
            answers.send(("error", str(error)))


if __name__ == "__main__":
    serve()

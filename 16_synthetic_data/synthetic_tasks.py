"""Tasks with checkable answers: copy, reverse, addition, key-value lookup.

Each task makes examples as a (prompt, answer) pair of strings; the training text of an example is
prompt + answer + END. The checker does not trust a stored answer: `solve(prompt)` recomputes the one
correct answer from the prompt itself, so any completion (a model's generation, say) can be graded:

    correct(prompt, completion)  <=>  completion up to its first END  ==  solve(prompt)

    copy      "copy:abc="                -> "abc"
    reverse   "reverse:abc="             -> "cba"
    addition  "12+345="                  -> "357"
    lookup    "ab:xy,cd:uv|cd="          -> "uv"      (keys distinct; the query is one of them)

Later topics reuse them: fine-tuning (12) trains on `example.text`, retrieval and long context (07)
use lookup with many pairs, pretraining objectives (11) and scaling (13) use them as probes.
Contents: END, Example, Task (the shared sampling and checking), CopyTask, ReverseTask, AdditionTask,
KeyValueTask, TASKS and make_task.
"""

import random
import string
from dataclasses import dataclass

END = "\n"
FORMAT_CHARACTERS = set(":=+,|" + END)  # reserved by the prompt formats; never part of an alphabet


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The full training string: prompt, answer and the end marker."""
        return self.prompt + self.answer + END


class Task:
    """Shared machinery: a seeded list of examples and the exact checker. Subclasses define `name`,
    `sample(rng)` and `solve(prompt)`."""

    name = "task"

    def sample(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def solve(self, prompt: str) -> str:
        raise NotImplementedError

    def examples(self, count: int, seed: int = 0) -> list[Example]:
        """`count` examples from random.Random(seed): the same seed gives the same list everywhere."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(count)]

    def check(self, prompt: str, completion: str) -> bool:
        """True exactly when the completion, cut at its first END, equals the answer of the prompt."""
        return completion.split(END, 1)[0] == self.solve(prompt)

    def accuracy(self, prompts: list[str], completions: list[str]) -> float:
        if len(prompts) != len(completions) or not prompts:
            raise ValueError(f"prompts and completions must be non-empty and of equal length, "
                             f"got {len(prompts)} and {len(completions)}")
        return sum(self.check(p, c) for p, c in zip(prompts, completions)) / len(prompts)


def _check_alphabet(alphabet: str) -> str:
    if not alphabet or FORMAT_CHARACTERS & set(alphabet):
        raise ValueError(f"alphabet must be non-empty and avoid the format characters "
                         f"{sorted(FORMAT_CHARACTERS)}, got {alphabet!r}")
    return alphabet


def _check_length_range(min_length: int, max_length: int) -> None:
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got min_length={min_length}, max_length={max_length}")


def _strip(prompt: str, prefix: str) -> str:
    if not (prompt.startswith(prefix) and prompt.endswith("=")):
        raise ValueError(f"prompt must look like '{prefix}...=', got {prompt!r}")
    return prompt[len(prefix):-1]


class CopyTask(Task):
    """Repeat a random string: the simplest test that a model can move information forward."""

    name, prefix = "copy", "copy:"

    def __init__(self, min_length: int = 1, max_length: int = 8, alphabet: str = string.ascii_lowercase):
        _check_length_range(min_length, max_length)
        self.min_length, self.max_length, self.alphabet = min_length, max_length, _check_alphabet(alphabet)

    def _random_string(self, rng: random.Random) -> str:
        return "".join(rng.choices(self.alphabet, k=rng.randint(self.min_length, self.max_length)))

    def sample(self, rng: random.Random) -> Example:
        payload = self._random_string(rng)
        return Example(f"{self.prefix}{payload}=", self._transform(payload))

    def solve(self, prompt: str) -> str:
        return self._transform(_strip(prompt, self.prefix))

    def _transform(self, payload: str) -> str:
        return payload


class ReverseTask(CopyTask):
    """Repeat a random string backwards: the answer's first symbol is the prompt's last."""

    name, prefix = "reverse", "reverse:"

    def _transform(self, payload: str) -> str:
        return payload[::-1]


class AdditionTask(Task):
    """a + b for random non-negative integers of 1..max_digits digits, written in decimal."""

    name = "addition"

    def __init__(self, max_digits: int = 3):
        if not isinstance(max_digits, int) or max_digits < 1:
            raise ValueError(f"max_digits must be an integer >= 1, got {max_digits!r}")
        self.max_digits = max_digits

    def sample(self, rng: random.Random) -> Example:
        a, b = (rng.randrange(10 ** rng.randint(1, self.max_digits)) for _ in range(2))
        return Example(f"{a}+{b}=", str(a + b))

    def solve(self, prompt: str) -> str:
        left, _, right = _strip(prompt, "").partition("+")
        if not (left.isdigit() and right.isdigit()):
            raise ValueError(f"prompt must look like '<digits>+<digits>=', got {prompt!r}")
        return str(int(left) + int(right))


class KeyValueTask(Task):
    """A list of key:value pairs, then a query key: answer with its value (retrieval from the context)."""

    name = "lookup"

    def __init__(self, num_pairs: int = 4, key_length: int = 2, value_length: int = 2,
                 alphabet: str = string.ascii_lowercase + string.digits):
        _check_alphabet(alphabet)
        if key_length < 1 or value_length < 1:
            raise ValueError(f"key_length and value_length must be >= 1, got {key_length}, {value_length}")
        if not 1 <= num_pairs <= len(set(alphabet)) ** key_length:
            raise ValueError(f"num_pairs must be in [1, {len(set(alphabet)) ** key_length}] (distinct keys), "
                             f"got {num_pairs}")
        self.num_pairs, self.key_length, self.value_length, self.alphabet = num_pairs, key_length, value_length, alphabet

    def sample(self, rng: random.Random) -> Example:
        keys = set()
        while len(keys) < self.num_pairs:
            keys.add("".join(rng.choices(self.alphabet, k=self.key_length)))
        keys = sorted(keys)
        rng.shuffle(keys)
        values = ["".join(rng.choices(self.alphabet, k=self.value_length)) for _ in keys]
        query = rng.randrange(self.num_pairs)
        pairs = ",".join(f"{k}:{v}" for k, v in zip(keys, values))
        return Example(f"{pairs}|{keys[query]}=", values[query])

    def solve(self, prompt: str) -> str:
        pairs, _, query = _strip(prompt, "").partition("|")
        table = dict(pair.split(":", 1) for pair in pairs.split(","))
        if query not in table:
            raise ValueError(f"query {query!r} is not among the keys of prompt {prompt!r}")
        return table[query]


TASKS = {task.name: task for task in (CopyTask, ReverseTask, AdditionTask, KeyValueTask)}


def make_task(name: str, **settings) -> Task:
    """A task by name ('copy', 'reverse', 'addition', 'lookup') with its settings."""
    if name not in TASKS:
        raise ValueError(f"name must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name](**settings)

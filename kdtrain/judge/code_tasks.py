"""Small function-writing tasks for the judge's probe set: a correct solution, a verbose but
equally correct one, and faulty versions (a syntax error, wrong logic), with unit tests.

Each task is parameterised by a constant drawn from the probe set's seeded RNG, so tens of
draws differ. The expected results come from a reference implementation written here (our
own code, run in-process); the candidates are only ever run through the sandbox
(:mod:`kdtrain.judge.checks`), and what the probe set records about them is what that run
found, never what a variant was meant to do: a mutant that happens to pass every test is not
used as the worse output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

TESTS_PER_TASK = 4


@dataclass(frozen=True)
class CodeTask:
    """One family; ``{k}`` in every text is the drawn constant."""

    function: str
    prompt: str
    reference: Callable[..., Any]  # (k, *args) -> the expected result
    draw_k: Callable[[random.Random], int]
    draw_args: Callable[[random.Random, int], tuple]  # one test's arguments
    correct: str
    verbose: str
    mutants: tuple[str, ...]  # wrong logic or a syntax error, each a separate program


def _ints(rng: random.Random, n: int = 5) -> list[int]:
    return [rng.randint(-20, 40) for _ in range(rng.randint(2, n))]


TASKS: tuple[CodeTask, ...] = (
    CodeTask(
        "count_multiples", "Write a Python function count_multiples(xs) that returns how many numbers in the list xs are multiples of {k}.",
        lambda k, xs: sum(1 for x in xs if x % k == 0), lambda r: r.randint(2, 7), lambda r, k: (_ints(r, 7),),
        "def count_multiples(xs):\n    return sum(1 for x in xs if x % {k} == 0)\n",
        'def count_multiples(xs):\n    """Count the numbers in xs that are multiples of {k}."""\n    count = 0\n'
        "    for x in xs:\n        # a multiple of {k} leaves no remainder\n        if x % {k} == 0:\n            count += 1\n    return count\n",
        ("def count_multiples(xs):\n    return sum(1 for x in xs if x % {k} == 1)\n",
         "def count_multiples(xs):\n    return len(xs) // {k}\n",
         "def count_multiples(xs)\n    return sum(1 for x in xs if x % {k} == 0)\n"),
    ),
    CodeTask(
        "clamp", "Write a Python function clamp(x) that returns x limited to the range from -{k} to {k} inclusive.",
        lambda k, x: max(-k, min(k, x)), lambda r: r.randint(3, 30), lambda r, k: (r.randint(-3 * k, 3 * k),),
        "def clamp(x):\n    return max(-{k}, min({k}, x))\n",
        'def clamp(x):\n    """Limit x to the range [-{k}, {k}]."""\n    # below the range: the lower end\n    if x < -{k}:\n'
        "        return -{k}\n    # above the range: the upper end\n    if x > {k}:\n        return {k}\n    return x\n",
        ("def clamp(x):\n    return min(-{k}, max({k}, x))\n",
         "def clamp(x):\n    return max(-{k}, x)\n",
         "def clamp(x):\n    return max(-{k}, min({k}, x)\n"),
    ),
    CodeTask(
        "scale", "Write a Python function scale(xs) that returns a new list with every number of the list xs multiplied by {k}.",
        lambda k, xs: [x * k for x in xs], lambda r: r.randint(2, 9), lambda r, k: (_ints(r),),
        "def scale(xs):\n    return [x * {k} for x in xs]\n",
        'def scale(xs):\n    """Return a new list: each number of xs times {k}."""\n    result = []\n    for x in xs:\n'
        "        # multiply, never modify xs itself\n        result.append(x * {k})\n    return result\n",
        ("def scale(xs):\n    return [x + {k} for x in xs]\n",
         "def scale(xs):\n    return xs * {k}\n",
         "def scale(xs):\n    return [x * {k} for x in xs\n"),
    ),
    CodeTask(
        "repeat_word", "Write a Python function repeat_word(word) that returns word repeated {k} times, joined by hyphens.",
        lambda k, w: "-".join([w] * k), lambda r: r.randint(2, 5), lambda r, k: (r.choice(("ab", "go", "tick", "x", "yes", "la")),),
        "def repeat_word(word):\n    return '-'.join([word] * {k})\n",
        'def repeat_word(word):\n    """Return word {k} times, with a hyphen between copies."""\n    parts = []\n'
        "    for _ in range({k}):\n        # one copy per repetition\n        parts.append(word)\n    return '-'.join(parts)\n",
        ("def repeat_word(word):\n    return word * {k}\n",
         "def repeat_word(word):\n    return '-'.join([word] * ({k} - 1))\n",
         "def repeat_word(word):\n    return '-'.join([word] * {k}\n"),
    ),
    CodeTask(
        "first_above", "Write a Python function first_above(xs) that returns the index of the first number in the list xs "
                       "greater than {k}, or -1 if there is none.",
        lambda k, xs: next((i for i, x in enumerate(xs) if x > k), -1), lambda r: r.randint(0, 25), lambda r, k: (_ints(r, 6),),
        "def first_above(xs):\n    return next((i for i, x in enumerate(xs) if x > {k}), -1)\n",
        'def first_above(xs):\n    """Index of the first number above {k}, or -1."""\n    for i, x in enumerate(xs):\n'
        "        # the first match wins\n        if x > {k}:\n            return i\n    # no number is above {k}\n    return -1\n",
        ("def first_above(xs):\n    return next((x for x in xs if x > {k}), -1)\n",
         "def first_above(xs):\n    return next((i for i, x in enumerate(xs) if x >= {k}), 0)\n",
         "def first_above(xs):\n    return next((i for i, x in enumerate(xs) if x > {k}), -1\n"),
    ),
    CodeTask(
        "digit_sum", "Write a Python function digit_sum(n) that returns the sum of the decimal digits of the whole number n "
                     "(n may be negative) plus {k}.",
        lambda k, n: sum(int(d) for d in str(abs(n))) + k, lambda r: r.randint(1, 9), lambda r, k: (r.randint(-9999, 99999),),
        "def digit_sum(n):\n    return sum(int(d) for d in str(abs(n))) + {k}\n",
        'def digit_sum(n):\n    """Sum of the decimal digits of n (its sign ignored), plus {k}."""\n    total = 0\n'
        "    for digit in str(abs(n)):\n        # one decimal digit at a time\n        total += int(digit)\n    return total + {k}\n",
        ("def digit_sum(n):\n    return sum(int(d) for d in str(n)) + {k}\n",
         "def digit_sum(n):\n    return abs(n) % 10 + {k}\n",
         "def digit_sum(n):\n    return sum(int(d) for d in str(abs(n)) + {k}\n"),
    ),
)


@dataclass(frozen=True)
class DrawnTask:
    """One task with its constant and tests: the prompt and the programs."""

    task: CodeTask
    k: int
    tests: tuple[tuple[tuple, Any], ...]

    @property
    def prompt(self) -> str:
        return self.task.prompt.format(k=self.k)

    def program(self, template: str) -> str:
        return template.format(k=self.k)

    @property
    def correct(self) -> str:
        return self.program(self.task.correct)

    @property
    def verbose(self) -> str:
        return self.program(self.task.verbose)

    @property
    def mutants(self) -> list[str]:
        return [self.program(m) for m in self.task.mutants]


def draw_task(rng: random.Random) -> DrawnTask:
    """A task, its constant and its unit tests (distinct arguments, expected values from the reference)."""
    task = rng.choice(TASKS)
    k = task.draw_k(rng)
    tests, seen = [], set()
    for _ in range(TESTS_PER_TASK * 10):
        args = task.draw_args(rng, k)
        key = repr(args)
        if key not in seen:
            seen.add(key)
            tests.append((args, task.reference(k, *args)))
        if len(tests) == TESTS_PER_TASK:
            break
    return DrawnTask(task, k, tuple(tests))

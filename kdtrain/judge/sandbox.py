"""Run a candidate Python function against its unit tests in a separate, restricted process.

The probe set's code outputs are judged by what they do, not by how they look, and the code is
treated as untrusted (a later probe set may hold a model's programs): it is never compiled or
executed in this process. Each candidate runs in its own ``python -I -S`` process (isolated: no
environment variables, no user or site packages, no current folder on the path) in an empty
temporary folder, with a wall-clock timeout, and the runner lowers its own limits before it
touches the candidate: CPU seconds, address space, and no file writes. That is a restriction,
not a jail: a real deployment that judges arbitrary programs should add an OS sandbox.

The runner reports whether the code compiles, how many tests pass, and the first error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

TIMEOUT_S = 10.0  # wall clock per candidate (Python's start-up included)
CPU_S = 2  # the candidate's own CPU seconds
MEMORY_BYTES = 512 * 2**20

_RUNNER = r"""
import json, resource, sys
spec = json.loads(sys.stdin.read())
resource.setrlimit(resource.RLIMIT_CPU, (spec["cpu_s"], spec["cpu_s"]))
resource.setrlimit(resource.RLIMIT_AS, (spec["memory"], spec["memory"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
out = {"compiles": False, "passed": 0, "total": len(spec["tests"]), "error": None}
try:
    code = compile(spec["code"], "<candidate>", "exec")
except (SyntaxError, ValueError) as exc:
    out["error"] = f"{type(exc).__name__}: {getattr(exc, 'msg', exc)} (line {getattr(exc, 'lineno', None)})"
else:
    out["compiles"] = True
    namespace = {}
    try:
        exec(code, namespace)
        function = namespace[spec["function"]]
    except BaseException as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    else:
        for args, expected in spec["tests"]:
            try:
                found = function(*args)
            except BaseException as exc:
                out["error"] = out["error"] or f"{type(exc).__name__}: {exc}"
                continue
            if found == expected:
                out["passed"] += 1
            else:
                out["error"] = out["error"] or f"{spec['function']}{tuple(args)!r}: expected {expected!r}, found {found!r}"
sys.stdout.write(json.dumps(out))
"""


@dataclass(frozen=True)
class RunResult:
    compiles: bool
    passed: int
    total: int
    error: str | None

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def correct(self) -> bool:
        return self.compiles and self.total > 0 and self.passed == self.total

    def to_json(self) -> dict:
        return {"check": "unit_tests", "compiles": self.compiles, "passed": self.passed, "total": self.total, "error": self.error}


@dataclass(frozen=True)
class Candidate:
    code: str
    function: str  # the name the tests call
    tests: tuple[tuple[tuple[Any, ...], Any], ...]  # (arguments, expected result), JSON values


def run_candidate(candidate: Candidate, timeout_s: float = TIMEOUT_S) -> RunResult:
    """One candidate in its own restricted process; a timeout or a crash is a failure, never an exception."""
    spec = {"code": candidate.code, "function": candidate.function, "tests": [[list(a), e] for a, e in candidate.tests],
            "cpu_s": CPU_S, "memory": MEMORY_BYTES}
    total = len(candidate.tests)
    with tempfile.TemporaryDirectory(prefix="kdjudge-") as cwd:
        try:
            done = subprocess.run([sys.executable, "-I", "-S", "-c", _RUNNER], input=json.dumps(spec), capture_output=True,
                                  text=True, timeout=timeout_s, cwd=cwd, env={})
        except subprocess.TimeoutExpired:
            return RunResult(True, 0, total, f"timeout after {timeout_s:g} s")
    try:
        out = json.loads(done.stdout)
    except json.JSONDecodeError:
        cause = (f"killed by signal {-done.returncode} (over {CPU_S} CPU s or {MEMORY_BYTES >> 20} MiB?)" if done.returncode < 0
                 else (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1])
        return RunResult(True, 0, total, f"the process died: {cause}")
    return RunResult(bool(out["compiles"]), int(out["passed"]), int(out["total"]), out["error"])


def run_all(candidates: Sequence[Candidate], workers: int = 2) -> list[RunResult]:
    """Every candidate, each in its own process, a few at a time; results in input order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run_candidate, candidates))

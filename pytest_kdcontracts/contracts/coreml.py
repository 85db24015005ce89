"""``coreml_contract.json``: the host-facing IO of every function at every enumerated length,
read from the saved mlpackage's spec (works on Linux)."""

from __future__ import annotations

from functools import partial
from typing import Iterator

from kdcontracts.models.coreml import CoreMLContract
from pytest_kdcontracts.check import Check, fail


def require_function(contract: str, kd_coreml, function: str, length: int, precision: str = "fp16") -> None:
    """Fail naming the package and the function it lacks: a package converted elsewhere may speak
    host API 1.0 (prefill and decode, no verify)."""
    found = kd_coreml.io(length, precision)
    if function not in found:
        fail(contract, f"function {function!r} in {kd_coreml.package(length, precision)}", f"a function named {function!r}",
             f"functions {sorted(found)}", "re-convert the package (`kdtrain convert`), or drop the function from "
             "coreml_contract.json if the package is not meant to offer it (verify: host API 1.1)")


def check_io(c: CoreMLContract, function: str, length: int, kd_coreml) -> None:
    package = kd_coreml.package(length)
    require_function(c.file.name, kd_coreml, function, length)
    found, spec = kd_coreml.io(length)[function], c.functions[function]
    problems = []
    for group in ("inputs", "outputs", "states"):
        want = {t.name: t for t in getattr(spec, group)}
        have = {t.name: t for t in getattr(found, group)}
        for name in sorted(want.keys() - have.keys()):
            problems.append(f"{group}: {name!r} missing (found {sorted(have)})")
        for name in sorted(have.keys() - want.keys()):
            problems.append(f"{group}: unexpected {name!r}")
        for name in sorted(want.keys() & have.keys()):
            shape = c.bind(want[name].shape, length)
            if have[name].shape != shape:
                problems.append(f"{group}: {name!r} shape expected {list(shape)}, found {list(have[name].shape)}")
            if have[name].dtype != want[name].dtype:
                problems.append(f"{group}: {name!r} dtype expected {want[name].dtype}, found {have[name].dtype}")
    if problems:
        fail(c.file.name, f"IO of {function}-{length} in {package}", "the contract's names, shapes and dtypes", "\n    " + "\n    ".join(problems))


def check_host_api(c: CoreMLContract, kd_artifacts) -> None:
    from kdtrain.runtime.host import check_host_api as read_version

    read_version(kd_artifacts, c.host_api_version)


def checks(c: CoreMLContract) -> Iterator[Check]:
    from pytest_kdcontracts.contracts import coreml_ane, coreml_golden

    yield Check("host_api_version", (), partial(check_host_api, c), ("kd_artifacts",))
    for function, length in c.items():
        yield Check("io", (function, str(length)), partial(check_io, c, function, length), ("kd_coreml",))
    yield from coreml_golden.checks(c)
    yield from coreml_ane.checks(c)

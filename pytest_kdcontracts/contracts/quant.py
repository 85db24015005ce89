"""``quant_recipe.yaml``: the INT8 packages follow the recipe (read from their MIL programs),
stay close enough to the FP16 ones (A/B through the same backend), are smaller and no slower
(weights read from the programs, latency and peak memory as `kdtrain quantize` recorded them in
quant/ab.json: the test run times nothing), and never produce NaN/Inf."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import numpy as np

from kdcontracts.models.quant import QuantContract, Quantize
from kdtrain.artifact_table import QUANT_AB, QUANT_CALIBRATION
from kdtrain.quant.recipe import const_name
from pytest_kdcontracts.check import Check, fail
from pytest_kdcontracts.contracts.coreml import require_function


def _settings(c: QuantContract, kd_artifacts):
    from kdtrain.errors import ConfigError
    from kdtrain.quant.stage import student_modules

    try:
        return c.recipe.resolve(student_modules(kd_artifacts), c.file.name)
    except ConfigError as exc:
        fail(c.file.name, "recipe against the student's modules", "every pattern matching a module, one setting per module", f"\n    {exc}")


def check_coverage(c: QuantContract, kd_artifacts) -> None:
    _settings(c, kd_artifacts)


def _compressed(op) -> dict:
    """dtype and scale shape of a constexpr weight, in the terms the recipe uses."""
    from kdtrain.coreml.inspect import dtype_name

    data, scale = op.inputs.get("data"), op.inputs.get("scale")
    offset = op.inputs.get("offset")
    return {
        "op": op.op_type,
        "dtype": dtype_name(data) if data is not None else "?",
        "data_shape": tuple(data.shape) if data is not None else (),
        "scale_shape": tuple(scale.shape) if scale is not None else (),
        "symmetric": offset is None or not np.any(offset.val),
    }


def check_conformance(c: QuantContract, function: str, length: int, kd_artifacts, kd_coreml) -> None:
    settings = _settings(c, kd_artifacts)
    require_function(c.file.name, kd_coreml, function, length, "int8")
    ops = {op.name: op for op in kd_coreml.mil(length, "int8").functions[function].operations}
    problems = []
    for module, setting in sorted(settings.items()):
        name = const_name(module)
        quantized = ops.get(f"{name}_quantized") or next((op for n, op in ops.items() if n.startswith(name) and op.op_type.startswith("constexpr_")), None)
        plain = ops.get(name)
        if isinstance(setting, Quantize):
            if quantized is None:
                problems.append(f"{module}: expected {setting}, found {'FP16 (not quantized)' if plain is not None else 'no such weight in the program'}")
                continue
            found = _compressed(quantized)
            channels = found["data_shape"][0] if found["data_shape"] else None
            per_channel = len(found["scale_shape"]) >= 1 and found["scale_shape"][0] == channels and int(np.prod(found["scale_shape"][1:])) == 1
            per_tensor = int(np.prod(found["scale_shape"] or (1,))) == 1
            granularity = "per_channel" if per_channel and channels != 1 else "per_tensor" if per_tensor else f"scale {found['scale_shape']}"
            if found["dtype"] != setting.dtype or granularity != setting.granularity or found["symmetric"] != setting.symmetric:
                problems.append(f"{module}: expected {setting}, found {found['dtype']} {granularity} "
                                f"{'symmetric' if found['symmetric'] else 'asymmetric'} ({found['op']}, scale {list(found['scale_shape'])})")
        elif quantized is not None:
            problems.append(f"{module}: expected {setting}, found {_compressed(quantized)['dtype']} ({quantized.op_type})")
        elif plain is None:
            problems.append(f"{module}: expected its FP16 weight {name!r} in the program, found none")
    if problems:
        fail(c.file.name, f"recipe conformance of {function}-{length} in {kd_coreml.package(length, 'int8')}",
             "every weight quantized or kept as the recipe says", "\n    " + "\n    ".join(problems[:15]))


def _calibration(kd_artifacts) -> list[dict]:
    import json

    return json.loads(kd_artifacts.path(QUANT_CALIBRATION).read_text(encoding="utf-8"))["samples"]


def _recorded_latency(c: QuantContract, kd_artifacts, length: int) -> dict:
    """The latency and memory `kdtrain quantize` measured at ``length`` (quant/ab.json)."""
    import json

    from kdtrain.quant.ab import LATENCY_KEYS

    from kdtrain.errors import ArtifactError

    try:
        path = kd_artifacts.path(QUANT_AB)
    except ArtifactError as exc:  # INT8 packages registered with `kdtrain add`, say
        fail(c.file.name, f"the A/B record of L={length} ({QUANT_AB.path})",
             "the latency and memory `kdtrain quantize` records", str(exc), "run `kdtrain quantize` to measure them")
    entries = json.loads(path.read_text(encoding="utf-8"))
    index = next((i for i, e in enumerate(entries) if isinstance(e, dict) and e.get("length") == length), None)
    if index is None:
        fail(c.file.name, f"the A/B record of L={length} in {path}", f"an entry with length {length}",
             f"lengths {[e.get('length') for e in entries if isinstance(e, dict)]}", "re-run `kdtrain quantize`")
    entry = entries[index]
    missing = [key for key in (*LATENCY_KEYS, "backend") if key not in entry]
    if missing:
        fail(c.file.name, f"{path}: at [{index}].{missing[0]} (L={length})",
             f"the latency and memory `kdtrain quantize` records ({', '.join(missing)})", "no such key",
             "quant/ab.json was written before the A/B measured latency: re-run `kdtrain quantize`")
    return {key: entry[key] for key in (*LATENCY_KEYS, "backend")}


def check_ab(c: QuantContract, length: int, kd_artifacts, kd_coreml, kd_tokenizers, kd_report) -> None:
    """Accuracy re-measured here; weight bytes read from the programs; latency and peak memory
    judged from quant/ab.json as recorded by the quantize stage (no timed assertion in a test run)."""
    from dataclasses import replace

    from kdtrain.quant.ab import measure_ab, package_size, weight_bytes
    from kdtrain.quant.stage import ab_prompts
    from kdtrain.runtime.speed import PEAK_OBSERVABLE

    bounds = c.recipe.ab
    fp16, int8 = kd_coreml.package(length), kd_coreml.package(length, "int8")
    recorded = _recorded_latency(c, kd_artifacts, length)
    timed_on = recorded.pop("backend")
    prompts = ab_prompts(_calibration(kd_artifacts))
    pad_id = kd_tokenizers["student"].transformers.pad_token_id
    result = measure_ab(kd_coreml.session(length), kd_coreml.session(length, "int8"), prompts, bounds["decode_steps"], length, pad_id,
                        (package_size(fp16), package_size(int8)),
                        weights=(weight_bytes(kd_coreml.mil(length)), weight_bytes(kd_coreml.mil(length, "int8"))))
    result = replace(result, **recorded)
    where = "" if timed_on == result.backend else f" (latency recorded on {timed_on})"
    kd_report(f"quant A/B {result.summary()}{where}")
    problems = []
    if result.nonfinite:
        problems.append(f"{result.nonfinite} NaN/Inf values in the INT8 logits")
    if not result.cosine_min >= bounds["cosine_min"]:
        problems.append(f"worst-step cosine {result.cosine_min:.5f} < {bounds['cosine_min']}")
    if result.max_abs > bounds["max_abs_max"]:
        problems.append(f"max |logit diff| {result.max_abs:.3f} > {bounds['max_abs_max']}")
    if result.greedy_agreement < bounds["greedy_agreement_min"]:
        problems.append(f"greedy agreement {result.greedy_agreement:.0%} < {bounds['greedy_agreement_min']:.0%}")
    if result.size_ratio > bounds["size_ratio_max"]:
        problems.append(f"size ratio {result.size_ratio:.2f} > {bounds['size_ratio_max']}")
    if not result.weight_bytes_ratio <= bounds["weight_bytes_ratio_max"]:
        problems.append(f"weight bytes ratio {result.weight_bytes_ratio:.3f} ({result.weight_bytes_int8:,}/{result.weight_bytes_fp16:,}) "
                        f"> {bounds['weight_bytes_ratio_max']}")
    if result.ttft_ratio is None:
        problems.append(f"no TTFT recorded in quant/ab.json (ttft_fp16_s {result.ttft_fp16_s}, ttft_int8_s {result.ttft_int8_s})")
    elif not result.ttft_ratio <= bounds["ttft_ratio_max"]:
        problems.append(f"TTFT ratio {result.ttft_ratio:.2f} ({result.ttft_int8_s * 1e3:.1f}/{result.ttft_fp16_s * 1e3:.1f} ms, "
                        f"recorded on {timed_on}) > {bounds['ttft_ratio_max']}")
    if result.peak_ratio is None:
        if timed_on in PEAK_OBSERVABLE:
            problems.append(f"no prefill peak recorded in quant/ab.json on {timed_on}, where it is observable")
    elif not result.peak_ratio <= bounds["peak_ratio_max"]:
        problems.append(f"prefill peak ratio {result.peak_ratio:.3f} ({result.peak_int8_bytes:,}/{result.peak_fp16_bytes:,} bytes) "
                        f"> {bounds['peak_ratio_max']}")
    if problems:
        fail(c.file.name, f"INT8 vs FP16 at L={length} [{result.backend}]", "within the recipe's ab bounds", "; ".join(problems), result.summary())


def check_finite(c: QuantContract, length: int, kd_artifacts, kd_coreml, kd_tokenizers) -> None:
    from kdtrain.runtime.host import Host

    host = Host(kd_coreml.session(length, "int8"), length, kd_tokenizers["student"].transformers.pad_token_id)
    for sample in _calibration(kd_artifacts):
        _, logits = host.prefill(sample["ids"][:length])
        bad = int((~np.isfinite(logits)).sum())
        if bad:
            fail(c.file.name, f"INT8 logits at L={length} on calibration sample {sample['kind']}[{sample['index']}]", "finite", f"{bad} NaN/Inf")


def checks(c: QuantContract) -> Iterator[Check]:
    yield Check("recipe_coverage", (), partial(check_coverage, c), ("kd_artifacts",))
    for function, length in c.coreml.items():
        yield Check("conformance", (function, str(length)), partial(check_conformance, c, function, length), ("kd_artifacts", "kd_coreml"))
    for length in c.coreml.lengths:
        yield Check("ab", (str(length),), partial(check_ab, c, length), ("kd_artifacts", "kd_coreml", "kd_tokenizers", "kd_report"))
        yield Check("finite", (str(length),), partial(check_finite, c, length), ("kd_artifacts", "kd_coreml", "kd_tokenizers"))

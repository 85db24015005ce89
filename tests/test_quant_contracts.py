"""Quantization contracts fail on the right item: per-tensor where the recipe says per-channel,
a norm weight quantized against the recipe, a pattern that matches nothing, an A/B delta
beyond the bounds (a deliberately coarse recipe)."""

from __future__ import annotations

import pytest
import yaml

from kdcontracts.models.quant import Keep, Quantize, Recipe, Rule
from kdtrain.artifact_table import coreml_package
from kdtrain.errors import ConfigError

INT8 = coreml_package(64, "int8").path
FP16 = coreml_package(64).path


def _requantize(workspace, change) -> None:
    """Quantize the L=64 FP16 package with the reference settings, changed by ``change``."""
    from kdtrain.quant.quantize import quantize_package
    from kdtrain.quant.stage import student_modules

    ctx = workspace.stage_context()
    settings = ctx.contract("quant_recipe.yaml").recipe.resolve(student_modules(ctx.folder))
    change(settings)
    quantize_package(workspace.artifacts / FP16, workspace.artifacts / INT8, settings)


def test_per_tensor_where_the_recipe_says_per_channel_fails_conformance(workspace):
    def per_tensor(settings):
        settings["model.layers.1.self_attn.q_proj"] = Quantize("int8", "per_tensor", True)

    _requantize(workspace, per_tensor)
    result = workspace.run("-k", "conformance")
    assert workspace.failed(result) == {"conformance[prefill-64]", "conformance[decode-64]", "conformance[verify-64]"}
    result.stdout.fnmatch_lines([
        "*recipe conformance of prefill-64 in *int8/student-L64.mlpackage",
        "*model.layers.1.self_attn.q_proj: expected int8 per_channel symmetric, found int8 per_tensor symmetric (constexpr_blockwise_shift_scale, scale [[]1, 1[]])",
    ])


def test_weight_kept_fp16_by_the_recipe_but_quantized_fails_conformance(workspace):
    """The recipe keeps the halt head (and norms) FP16. coremltools' quantizer never compresses
    the 1-D norm weights (they feed elementwise ops), so the planted case is the halt head."""

    def quantize_kept(settings):
        settings["halt_head"] = Quantize("int8", "per_tensor", True)

    _requantize(workspace, quantize_kept)
    result = workspace.run("-k", "conformance and 64")
    assert workspace.failed(result) == {"conformance[prefill-64]", "conformance[decode-64]", "conformance[verify-64]"}
    result.stdout.fnmatch_lines(["*halt_head: expected keep fp16, found int8 (constexpr_blockwise_shift_scale)"])


def test_pattern_that_matches_nothing_fails_coverage_and_quantize_refuses(workspace):
    path = workspace.contracts / "quant_recipe.yaml"
    data = yaml.safe_load(path.read_text())
    data["rules"][0]["pattern"] = "model.layers.*.self_attn.*_projection"
    path.write_text(yaml.safe_dump(data))
    result = workspace.run("-k", "recipe_coverage")
    assert workspace.failed(result) == {"recipe_coverage"}
    result.stdout.fnmatch_lines(["*at rules[[]0[]].pattern: expected a pattern matching at least one module of the student, found none matching 'model.layers.*.self_attn.*_projection'"])

    from kdtrain.pipeline import run_pipeline

    with pytest.raises(ConfigError, match=r"rules\[0\]\.pattern"):
        run_pipeline(workspace.artifacts, ["quantize"], contracts=workspace.contracts)


def test_two_rules_claiming_a_module_differently_is_an_error():
    recipe = Recipe((Rule("a", "model.norm", Keep()), Rule("b", "*norm", Quantize("int8", "per_tensor", True))), {}, {})
    with pytest.raises(ConfigError, match=r"found 'model.norm' claimed by rules\[0\] \(keep fp16\) and rules\[1\] \(int8 per_tensor symmetric\)"):
        recipe.resolve(["model.norm", "model.layers.0.input_layernorm"])


def test_coarse_recipe_fails_ab(workspace):
    def coarse(settings):
        for module, setting in settings.items():
            if isinstance(setting, Quantize):
                settings[module] = Quantize("int4", "per_tensor", True)

    _requantize(workspace, coarse)
    result = workspace.run("-k", "ab and 64")
    assert workspace.failed(result) == {"ab[64]"}
    result.stdout.fnmatch_lines([
        "*INT8 vs FP16 at L=64 [[]mil-reference[]]",
        "*expected: within the recipe's ab bounds",
        "*worst-step cosine *",
    ])


def test_norm_weight_quantized_against_the_recipe_fails_conformance(reference_artifacts, test_contracts):
    """coremltools 9 refuses to compress 1-D tensors (rdar://113860800), so a quantized norm
    can only come from another tool: built here as a MIL program, checked by the same item."""
    import numpy as np
    from coremltools.converters.mil import Builder as mb

    from kdtrain.artifacts import ArtifactsFolder
    from kdtrain.quant.recipe import const_name
    from kdtrain.quant.stage import student_modules
    from kdcontracts.families import load
    from pytest_kdcontracts.contracts.quant import check_conformance
    from pytest_kdcontracts.errors import ContractViolation

    artifacts = ArtifactsFolder.open(reference_artifacts)
    contract = load(test_contracts / "quant_recipe.yaml")
    settings = contract.recipe.resolve(student_modules(artifacts))

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=__import__("coremltools").target.iOS18)
    def program(x):
        outs = [x]
        for module, setting in settings.items():
            name = const_name(module)
            if isinstance(setting, Quantize) or module == "model.norm":
                rows = 576 if module == "model.norm" else 4
                data = np.ones((rows,) if module == "model.norm" else (rows, 8), dtype=np.int8)
                scale = np.ones((1,) if module == "model.norm" else (rows, 1), dtype=np.float16)
                outs.append(mb.constexpr_blockwise_shift_scale(data=data, scale=scale, name=f"{name}_quantized"))
            else:
                outs.append(mb.const(val=np.ones((4,), dtype=np.float16), name=name))
        return x

    class Packages:
        def io(self, length, precision):
            return {"prefill": {}}

        def mil(self, length, precision):
            return type("P", (), {"functions": {"prefill": program.functions["main"]}})()

        def package(self, length, precision):
            return "synthetic.mlpackage"

    with pytest.raises(ContractViolation) as info:
        check_conformance(contract, "prefill", 64, artifacts, Packages())
    assert "model.norm: expected keep fp16, found int8 (constexpr_blockwise_shift_scale)" in str(info.value)
    assert sum("expected" in line for line in str(info.value).splitlines()[3:]) == 1  # only the norm


def _edit_ab(workspace, length: int, change) -> None:
    def edit(entries):
        change(next(e for e in entries if e["length"] == length))

    workspace.edit_json("quant/ab.json", edit)


def test_int8_ttft_recorded_10x_fp16_fails_ab(workspace):
    """Latency is judged from what `kdtrain quantize` recorded: nothing is timed in the test run."""
    _edit_ab(workspace, 64, lambda entry: entry.update(ttft_int8_s=10 * entry["ttft_fp16_s"]))
    result = workspace.run("-k", "ab[64]")
    assert workspace.failed(result) == {"ab[64]"}
    result.stdout.fnmatch_lines([
        "*INT8 vs FP16 at L=64 [[]mil-reference[]]",
        "*TTFT ratio 10.00 (* ms, recorded on mil-reference) > 3.0*",
    ])


def test_weight_bound_below_the_measured_ratio_fails_ab(workspace):
    path = workspace.contracts / "quant_recipe.yaml"
    data = yaml.safe_load(path.read_text())
    data["ab"]["weight_bytes_ratio_max"] = 0.45  # the reference measures 0.502
    path.write_text(yaml.safe_dump(data))
    result = workspace.run("-k", "ab[64]")
    assert workspace.failed(result) == {"ab[64]"}
    result.stdout.fnmatch_lines(["*weight bytes ratio 0.502 (39,070,478/77,872,898) > 0.45*"])


def test_ab_record_without_latency_fails_naming_file_and_key(workspace):
    """An ab.json written before the A/B measured latency (an old quantize stage)."""
    _edit_ab(workspace, 64, lambda entry: entry.pop("ttft_int8_s"))
    result = workspace.run("-k", "ab[64]")
    assert workspace.failed(result) == {"ab[64]"}
    result.stdout.fnmatch_lines([
        "*quant/ab.json: at [[]0[]].ttft_int8_s (L=64)",
        "*expected: the latency and memory `kdtrain quantize` records (ttft_int8_s)",
        "*found:    no such key",
        "*re-run `kdtrain quantize`",
    ])

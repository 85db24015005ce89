"""runtime_budget.yaml: the arithmetic against real models and published sizes, and each item
failing on its planted fault (a package the arithmetic does not predict, a KV state of another
size, an edited runtime config, a device too small for a size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdcontracts.families import load
from kdcontracts.models.quant import Keep
from kdcontracts.models.runtime_budget import Shape
from kdtrain.artifact_table import RUNTIME_CONFIG, coreml_package
from kdtrain.runtime.budget import kv_bytes_per_token, parameter_shapes, weight_bytes
from kdtrain.student.model import StudentConfig, StudentLM

REPO = Path(__file__).resolve().parents[1]
CONTRACT = load(REPO / "contracts/runtime_budget.yaml")
RECIPE = load(REPO / "contracts/quant_recipe.yaml").recipe


@pytest.mark.parametrize("tied", [True, False])
def test_parameters_are_the_students_own(tied):
    """The enumerated parameters are exactly a real student's, names and shapes (tied or not)."""
    config = StudentConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=tied)
    student = StudentLM(config)
    found = {name: tuple(p.shape) for name, p in student.named_parameters()}  # a tied matrix is listed once
    shape = Shape(2, 32, 4, 2, 16, 48, 97, tied)
    assert parameter_shapes(shape) == found
    assert weight_bytes(shape, None) == 2 * sum(p.numel() for p in student.parameters())


# Published parameter counts (model cards) of the contract's sizes: a typo in a shape shows here.
PUBLISHED = {"llama-3.2-3b": 3.21e9, "minitron-4b": 4.51e9, "llama-2-7b": 6.74e9, "yi-1.5-9b": 8.83e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_contract_shapes_give_the_published_sizes(name):
    shape = next(s.shape for s in CONTRACT.sizes if s.name == name)
    parameters = weight_bytes(shape, None) / 2 - (shape.hidden + 1)  # less the halt head the student adds
    assert parameters == pytest.approx(PUBLISHED[name], rel=0.01)


def test_kv_cache_per_token_is_the_textbook_figure():
    """Llama-2-7B (MHA) caches 0.5 MiB per token in FP16; a GQA model with 8 of 32 KV heads a quarter."""
    by_name = {s.name: s.shape for s in CONTRACT.sizes if s.shape}
    assert kv_bytes_per_token(by_name["llama-2-7b"], 2) == 512 * 1024
    assert kv_bytes_per_token(by_name["minitron-4b"], 2) == 128 * 1024


def test_int8_weights_follow_the_recipe():
    """Quantized modules cost a byte per weight and an FP16 scale per output channel; kept ones two bytes."""
    shape = Shape(1, 8, 2, 1, 4, 16, 10, True)
    int8 = weight_bytes(shape, RECIPE)
    linear = [(8, 8), (4, 8), (4, 8), (8, 8), (16, 8), (16, 8), (8, 16), (10, 8)]  # q k v o gate up down, lm_head (tied)
    kept = 8 * 3 + 9  # three norms, the halt head
    assert int8 == sum(o * i + 2 * o for o, i in linear) + 2 * kept


def _edit_yaml(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_contract_faults_fail_kv_state_table_and_runtime_config(workspace):
    def shrink(data):
        data["kv_bytes"] = 1  # the packages' states are FP16: half the bytes they allocate
        data["device"].update(memory_gib=8, reserve_gib={"os": 0.5})  # a 9B student's INT8 weights do not fit

    _edit_yaml(workspace.contracts / "runtime_budget.yaml", shrink)
    workspace.edit_json(RUNTIME_CONFIG.path, lambda c: c["sizes"][0]["contexts"][0].update(max_sessions=10**6))
    result = workspace.run("-k", "runtime_budget and not pool")
    assert workspace.failed(result) == {"kv_state[64]", "kv_state[128]", "table", "runtime_config"}
    result.stdout.fnmatch_lines([
        "*KV-cache state bytes of one session at L=64 *",
        "*expected: 73,728 (2 x layers x KV heads x head dim x 1 bytes x 64)",
        "*found:    147,456",
        "*sizes[[]0[]].contexts[[]0[]].max_sessions: expected 108678, found 1000000",
        "*none for yi-1.5-9b at L=64 *",
    ])


def test_package_the_arithmetic_does_not_predict_fails_weights(workspace):
    """The INT8 package at L=64 re-quantized with the MLP left in FP16: the recipe's bytes no longer hold."""
    from kdtrain.quant.quantize import quantize_package
    from kdtrain.quant.stage import student_modules

    ctx = workspace.stage_context()
    settings = ctx.contract("quant_recipe.yaml").recipe.resolve(student_modules(ctx.folder))
    settings.update({m: Keep() for m in settings if ".mlp." in m})
    quantize_package(workspace.artifacts / coreml_package(64).path, workspace.artifacts / coreml_package(64, "int8").path, settings)
    result = workspace.run("-k", "runtime_budget and weights")
    assert workspace.failed(result) == {"weights[int8-64]"}
    result.stdout.fnmatch_lines(["*weight bytes of *int8/student-L64.mlpackage", "*expected: 39,070,478 *within 0.5%",
                                 "*found:    47,011,214 (+20.32%)"])


def test_runtime_config_is_the_table_of_the_contract(reference_artifacts):
    config = json.loads((reference_artifacts / RUNTIME_CONFIG.path).read_text())
    assert [s["name"] for s in config["sizes"]] == [s.name for s in CONTRACT.sizes]
    student = config["sizes"][0]
    assert student["weights_int8"] == 39_070_478 and student["kv_bytes_per_token"] == 2 * 3 * 3 * 64 * 2
    assert [c["length"] for c in student["contexts"]] == [64, 128]


def test_a_rebuild_that_skips_the_appended_tokens_fails_pool(workspace, monkeypatch):
    from kdtrain.runtime.pool import SessionPool

    monkeypatch.setattr(SessionPool, "_replay", lambda self, prompt, appended: self.host.prefill(prompt)[0])
    result = workspace.run("-k", "runtime_budget and pool")
    assert workspace.failed(result) == {"pool[64]"}
    result.stdout.fnmatch_lines(["*session pool at L=64 [[]mil-reference[]]",
                                 "*expected: rebuilt sessions give exactly the logits of an unevicted run",
                                 "*found:    max |difference| *"])

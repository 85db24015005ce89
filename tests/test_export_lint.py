"""The graph linter names the node, its op and its module for each rule it enforces."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kdcontracts.models.export_lint import LintRules
from kdtrain.export.graph import summarize_program
from kdtrain.export.lint import lint
from kdtrain.export.programs import PrefillProgram, VerifyProgram, example_inputs
from kdtrain.student.model import StudentConfig, StudentLM

RULES = LintRules(
    denylist=("diff", "index_copy"),
    int64_sinks=("softmax", "_softmax", "matmul", "linear"),
    mask_inputs=("attention_mask", "position"),
    cast_ops=("_to_copy", "to"),
    cast_baseline={"prefill": 2, "decode": 0},
)
TINY = StudentConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)


def _export(module: torch.nn.Module, function: str, length: int = 16):
    program = torch.export.export(module.eval(), example_inputs(function, length)).run_decompositions({})
    return summarize_program(program, function, length)


class Int64MaskPrefill(PrefillProgram):
    """The classic regression: a cumsum without dtype promotes the mask arithmetic to int64."""

    def forward(self, input_ids, attention_mask):
        s = self.student
        count = torch.cumsum(attention_mask, dim=-1)[0]  # int64
        allowed = torch.logical_and(count[None, :] <= count[:, None], attention_mask > 0)
        h = s.model.embed_tokens(input_ids)
        mask = (allowed.to(h.dtype) - 1.0) * 1e4 + count[None, :] * 0  # int64 flows into the mask
        for layer in s.model.layers:
            h = layer(h, self.rope_cos, self.rope_sin, mask)[0]
        return self._head(h[:, -1])


def test_reference_prefill_is_clean():
    assert lint(_export(PrefillProgram(StudentLM(TINY), 16), "prefill"), RULES) == []


def test_reference_verify_is_clean_with_its_one_cast():
    """The one-hot placement is the verify graph's one cast (bool -> float); its positions stay int32."""
    assert lint(_export(VerifyProgram(StudentLM(TINY), 16), "verify"), replace(RULES, cast_baseline={"verify": 1})) == []


def test_int64_into_the_mask_and_softmax_is_named_with_its_module():
    findings = lint(_export(Int64MaskPrefill(StudentLM(TINY), 16), "prefill"), RULES)
    int64 = [f for f in findings if f.rule == "int64-path"]
    assert int64 and int64[0].op.startswith("aten::cumsum")
    assert "int64 tensor reaches softmax/attention/mask arithmetic" in str(int64[0])


def test_transformers_llama_is_caught_before_conversion(monkeypatch):
    """transformers' Llama exports aten.diff (packed-sequence detection, when no attention mask
    is given): the linter names it with its module and conversion never runs."""
    import coremltools as ct
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdcontracts.families import load
    from kdtrain.coreml import stage
    from conftest import REPO

    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    llama = LlamaForCausalLM(config).eval()
    ids = torch.ones((1, 16), dtype=torch.long)
    program = torch.export.export(llama, (), {"input_ids": ids}).run_decompositions({})
    findings = lint(summarize_program(program, "prefill", 16), RULES)
    diff = [f for f in findings if f.rule == "convertible" and "diff" in f.op]
    assert diff, [str(f) for f in findings]
    assert str(diff[0]) == "[convertible] node 'diff' (aten::diff) in model: coremltools 9.0 has no converter for 'diff'"

    monkeypatch.setattr(stage, "export_program", lambda *a: program)
    monkeypatch.setattr(ct, "convert", lambda *a, **k: pytest.fail("conversion attempted"))
    with pytest.raises(stage.LintError, match="conversion not attempted, the linter found"):
        stage.convert_length(llama, 16, load(REPO / "contracts/coreml_contract.json"), RULES, (), None)


def test_nodes_out_of_topological_order_are_reported():
    summary = _export(PrefillProgram(StudentLM(TINY), 16), "prefill")
    nodes = list(summary.nodes)
    i = next(k for k, n in enumerate(nodes) if n.op.startswith("aten::softmax"))
    nodes[i], nodes[i - 1] = nodes[i - 1], nodes[i]
    findings = lint(replace(summary, nodes=tuple(nodes)), RULES)
    assert any(f.rule == "topological-order" and f.node == nodes[i - 1].name for f in findings)


def test_mask_cast_twice_and_cast_drift_are_reported_with_counts():
    class DoubleCast(PrefillProgram):
        def forward(self, input_ids, attention_mask):
            s = self.student
            h = s.model.embed_tokens(input_ids)
            allowed = torch.logical_and(torch.ones(16, 16, dtype=torch.bool).tril(), attention_mask > 0)
            mask = (allowed.to(torch.float16).to(h.dtype) - 1.0) * 1e4
            for layer in s.model.layers:
                h = layer(h, self.rope_cos, self.rope_sin, mask)[0]
            return self._head(h[:, -1])

    findings = lint(_export(DoubleCast(StudentLM(TINY), 16), "prefill"), replace(RULES, cast_baseline={"prefill": 1}))
    messages = [str(f) for f in findings]
    assert any("[mask-dtype]" in m and "cast 2 times" in m for m in messages), messages
    assert any("[mask-dtype]" in m and "mixes ['float16', 'float32']" in m for m in messages), messages
    assert any("[cast-budget]" in m and "casts per graph changed: baseline 1, now 2" in m for m in messages), messages

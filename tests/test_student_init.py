"""The student the config describes, initialised as far as the teacher's architecture allows."""

from __future__ import annotations

import pytest
import torch

from kdtrain.student.init import init_student
from kdtrain.tokenizers.migration import AddedTag
from kdtrain.train.config import Student
from tiny_family import build_teacher, build_tokenizer

SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("teachers")
    tokenizer = build_tokenizer(root / "tokenizer")
    return {arch: AutoModelForCausalLM.from_pretrained(build_teacher(root / arch, tokenizer, arch=arch)).eval()
            for arch in ("llama", "qwen3")}


TAG = AddedTag("<think>", 1200, [5, 6, 7])


def test_a_same_family_teacher_gives_its_layers(teachers):
    teacher = teachers["llama"]
    student, hf_config, record = init_student(teacher, [TAG], Student(layers=(0, 3)), vocab_size=1201)
    assert record.method == "teacher_layers" and record.teacher_layers == [0, 3] and hf_config["num_hidden_layers"] == 2
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"][1200], t["model.embed_tokens.weight"][[5, 6, 7]].mean(0))
    with torch.no_grad():  # the copied layers compute what the teacher's do: same logits with all of them kept
        full, _, _ = init_student(teacher, [], Student(layers=(0, 1, 2, 3)), vocab_size=1200)
        ids = torch.tensor([[1, 20, 30, 40]])
        torch.testing.assert_close(full(ids), teacher(ids).logits, rtol=1e-4, atol=1e-4)


def test_another_family_gives_its_embeddings_and_fresh_layers(teachers):
    student, _, record = init_student(teachers["qwen3"], [TAG], Student(shape=SHAPE), vocab_size=1201)
    assert record.method == "teacher_embeddings" and "qwen3" in record.why
    teacher = teachers["qwen3"].state_dict()
    assert torch.equal(student.state_dict()["model.embed_tokens.weight"][:1200], teacher["model.embed_tokens.weight"])
    assert student.state_dict()["model.layers.0.mlp.up_proj.weight"].std().item() == pytest.approx(0.02, rel=0.1)


def test_other_widths_or_no_weights_start_fresh(teachers):
    wider = dict(SHAPE, hidden_size=96, head_dim=24)
    _, hf_config, record = init_student(teachers["llama"], [TAG], Student(shape=wider), vocab_size=1201)
    assert record.method == "fresh" and "96" in record.why and hf_config["hidden_size"] == 96
    _, hf_config, record = init_student(None, [TAG], Student(shape=SHAPE), vocab_size=1201, token_ids={"bos": 1, "eos": 2, "pad": 3})
    assert record.method == "fresh" and record.teacher_family == "api" and hf_config["pad_token_id"] == 3
    with pytest.raises(ValueError, match="expected a shape"):
        init_student(teachers["qwen3"], [TAG], Student(layers=(0, 1)), vocab_size=1201)

"""The export-friendly student: transformers' Llama numbers, prefill + decode == forward, verify == decode steps."""

from __future__ import annotations

import pytest
import torch

from kdtrain.export.programs import DecodeProgram, PrefillProgram
from kdtrain.student.model import StudentLM
from conftest import reference_teacher


def _compare(reference: torch.Tensor, ours: torch.Tensor) -> tuple[float, float]:
    a, b = reference.double().flatten(), ours.double().flatten()
    return (a - b).abs().max().item(), torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def _against_transformers(folder_or_model, student: StudentLM, capsys, label: str) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, student.config.vocab_size, (2, 41))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding on the second row
    with torch.no_grad():
        reference = folder_or_model(input_ids=ids, attention_mask=mask).logits
        ours = student(ids, mask)
    keep = mask.bool()
    max_abs, cosine = _compare(reference[keep], ours[keep])
    with capsys.disabled():
        print(f"\n{label}: max |logit diff| {max_abs:.2e}, cosine {cosine:.8f}")
    assert cosine >= 0.99999 and max_abs < 1e-3


def test_student_matches_llama_for_causal_lm_on_its_checkpoint(reference_artifacts, capsys):
    from transformers import LlamaForCausalLM

    folder = reference_artifacts / "student/checkpoint"
    _against_transformers(LlamaForCausalLM.from_pretrained(folder).eval(), StudentLM.from_pretrained(folder), capsys, "student checkpoint")


@pytest.mark.slow
def test_student_module_matches_llama_on_the_full_teacher(tmp_path, capsys):
    from kdtrain.student.model import StudentConfig
    from kdtrain.teacher import source

    teacher = source.load_model(reference_teacher().source)
    hf_config = {k: v for k, v in teacher.config.to_dict().items() if k != "quantization_config"}
    student = StudentLM(StudentConfig.from_hf(hf_config))
    student.load_state_dict(teacher.state_dict(), strict=False)
    _against_transformers(teacher, student.eval(), capsys, "SmolLM2-135M teacher")


def test_halt_head_is_saved_with_the_checkpoint(reference_artifacts):
    from safetensors.torch import load_file

    weights = load_file(reference_artifacts / "student/checkpoint/model.safetensors")
    assert weights["halt_head.weight"].shape == (1, 576) and weights["halt_head.bias"].item() == -4.0


@pytest.mark.parametrize("prompt_length", [1, 17, 28])
def test_prefill_then_decode_equals_full_forward(reference_artifacts, prompt_length):
    student = StudentLM.from_pretrained(reference_artifacts / "student/checkpoint")
    length, steps = 32, 3
    ids = torch.randint(0, 49000, (1, length), dtype=torch.int32)
    mask = torch.zeros((1, length), dtype=torch.int32)
    mask[0, :prompt_length] = 1
    with torch.no_grad():
        full = student(ids[:, : prompt_length + steps].long())[0]
        prefill, decode = PrefillProgram(student, length), DecodeProgram(student, length)
        logits, _ = prefill(ids, mask)
        assert _compare(full[prompt_length - 1], logits[0])[1] > 0.99999
        decode.k_cache.copy_(prefill.k_cache)
        decode.v_cache.copy_(prefill.v_cache)
        for step in range(steps):
            position = torch.tensor([prompt_length + step], dtype=torch.int32)
            logits, _ = decode(ids[:, prompt_length + step : prompt_length + step + 1], position)
            assert _compare(full[prompt_length + step], logits[0])[1] > 0.99999, step


def test_verify_equals_decode_steps_and_a_rollback_forgets_the_rejected_tail(reference_artifacts):
    """The torch programs behind host API 1.1: a segment's rows are the decode steps' logits, a
    rollback past a wrong draft leaves nothing of it behind, and a short padded segment at the end
    of the context writes no slot past L."""
    import numpy as np

    from kdtrain.runtime.backend import TorchSession
    from kdtrain.runtime.host import Host

    student = StudentLM.from_pretrained(reference_artifacts / "student/checkpoint")
    length, segment = 32, 4
    host = Host(TorchSession(student, length, segment), length, pad_id=0)
    prompt = [1, 520, 33, 990, 1200, 77]
    state, logits = host.prefill(prompt)
    tokens, decoded = [], []
    for _ in range(segment + 2):
        tokens.append(int(np.argmax(logits)))
        state, logits = host.decode_step(state, tokens[-1])
        decoded.append(logits)
    state, _ = host.prefill(prompt)
    state, verified, halt = host.verify(state, tokens[:2] + [7, 8], segment)  # a draft wrong from its third token
    assert verified.shape == (segment, student.config.vocab_size) and halt.shape == (segment,) and state.position == len(prompt) + 4
    np.testing.assert_allclose(verified[:2], np.stack(decoded[:2]), atol=1e-4)
    state, verified, _ = host.verify(host.rollback(state, len(prompt) + 2), tokens[2:5], segment)  # 3 of 4: padded
    np.testing.assert_allclose(verified, np.stack(decoded[2:5]), atol=1e-4)
    state, _ = host.prefill(list(range(1, length - 1)))
    state, verified, _ = host.verify(state, [5, 6], segment)  # slots 30, 31; the padding's 32, 33 are past L
    assert state.position == length and np.isfinite(verified).all()

"""Initialise the student from the teacher, as far as their architectures allow.

Three ways, the first that applies, recorded in ``student/init.json``:

- ``teacher_layers``: a same-family teacher (a Llama without biases, whose parameter names
  and shapes are the student's) with matching widths: the chosen layers are copied, first
  and last included in the reference, which gives a student that already produces sensible
  logit distributions, what distillation starts from;
- ``teacher_embeddings``: another family (Qwen2's attention biases, Phi-3's fused
  projections) or other widths, with the same hidden size: the token embeddings (and an
  untied LM head) are copied and the transformer layers start fresh;
- ``fresh``: nothing of the teacher fits; every weight starts fresh (normal, std 0.02, as
  transformers initialises a Llama), from a fixed seed.

Each new tag's embedding row is the mean of the teacher rows of the pieces the teacher splits
it into, so ``<think>`` starts near ``<`` + ``think`` + ``>``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kdtrain.student.model import StudentConfig, StudentLM

INIT_SEED = 0
INIT_STD = 0.02  # transformers' initializer_range default


@dataclass(frozen=True)
class StudentInit:
    teacher: str
    teacher_family: str
    method: str  # teacher_layers | teacher_embeddings | fresh
    teacher_layers: list[int]
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    parameters: int
    embedding_init: dict
    why: str

    def to_json(self) -> dict:
        return asdict(self)


def teacher_shape(tconf) -> dict:
    """A transformers config's shape in the keys of the distill config's student.shape."""
    heads = tconf.num_attention_heads
    return {
        "num_hidden_layers": tconf.num_hidden_layers, "hidden_size": tconf.hidden_size,
        "intermediate_size": tconf.intermediate_size, "num_attention_heads": heads,
        "num_key_value_heads": getattr(tconf, "num_key_value_heads", None) or heads,
        "head_dim": getattr(tconf, "head_dim", None) or tconf.hidden_size // heads,
        "tie_word_embeddings": bool(getattr(tconf, "tie_word_embeddings", False)),
    }


def _same_family(tconf) -> str | None:
    """Why the teacher's layers cannot be copied into the student, or None when they can."""
    if tconf.model_type != "llama":
        return f"the teacher is a {tconf.model_type!r} model; the student's layers are Llama's"
    if getattr(tconf, "attention_bias", False) or getattr(tconf, "mlp_bias", False):
        return "the teacher's projections have biases; the student's have none"
    return None


def _rope_theta(tconf) -> float:
    rope = getattr(tconf, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(tconf, "rope_theta", 10000.0)))


def init_student(teacher_model, added_tags, spec, teacher_name: str = "teacher", vocab_size: int | None = None,
                 token_ids: dict | None = None):
    """Return (:class:`StudentLM`, the transformers Llama config dict it is saved with, :class:`StudentInit`).

    ``spec`` is the distill config's ``student`` section (``layers``, ``shape``); ``vocab_size``
    is the student tokenizer's (by default the teacher's plus the added tags). ``teacher_model``
    None (an API teacher, whose weights are not here): every weight fresh, ``token_ids``
    (bos/eos/pad) from the tokenizer."""
    from transformers import LlamaConfig

    tconf = teacher_model.config if teacher_model is not None else None
    if tconf is None and spec.shape is None:
        raise ValueError("student: expected a shape since the teacher has no weights here (an API teacher), found layers only")
    widths_of_teacher = teacher_shape(tconf) if tconf is not None else {}
    shape = {**widths_of_teacher, "num_hidden_layers": len(spec.layers)} if spec.shape is None else spec.shape.model_dump()
    teacher_vocab = tconf.vocab_size if tconf is not None else 0
    vocab = max(vocab_size or 0, teacher_vocab + len(added_tags) if vocab_size is None else teacher_vocab)
    layers = list(spec.layers or ())
    if tconf is not None and layers and max(layers) >= tconf.num_hidden_layers:
        raise ValueError(f"student.layers: expected teacher layer indices < {tconf.num_hidden_layers}, found {layers}")
    not_family = _same_family(tconf) if tconf is not None else "an API teacher"
    widths = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    other_widths = [k for k in widths if shape[k] != widths_of_teacher.get(k)]
    if tconf is None:
        method, why = "fresh", "an API teacher: its weights are not here, every weight fresh"
    elif layers and not_family is None and not other_widths:
        method, why = "teacher_layers", "same family and widths: the listed teacher layers are copied"
    elif shape["hidden_size"] == widths_of_teacher["hidden_size"]:
        method = "teacher_embeddings"
        why = not_family or (f"widths differ from the teacher's ({', '.join(other_widths)})" if other_widths else "no teacher layers listed")
        why += ": embeddings copied, layers fresh"
    else:
        method, why = "fresh", f"hidden size {shape['hidden_size']} differs from the teacher's {widths_of_teacher['hidden_size']}: every weight fresh"
    if method != "teacher_layers" and spec.shape is None:
        raise ValueError(f"student: expected a shape since the teacher's layers cannot be copied ({why}), found layers only")

    if method == "teacher_layers":  # the teacher's own config, so every setting it has (rope, eps, ids) carries over
        hf = {k: v for k, v in tconf.to_dict().items() if k not in ("quantization_config", "_name_or_path", "architectures", "transformers_version")}
        hf.update(num_hidden_layers=len(layers), vocab_size=vocab)
        config = LlamaConfig(**hf)
    else:
        config = LlamaConfig(
            vocab_size=vocab, **{k: shape[k] for k in (*widths, "num_hidden_layers", "tie_word_embeddings")},
            rms_norm_eps=float(getattr(tconf, "rms_norm_eps", 1e-5)), rope_theta=_rope_theta(tconf),
            max_position_embeddings=int(getattr(tconf, "max_position_embeddings", 4096)),
            **{f"{role}_token_id": (token_ids or {}).get(role, getattr(tconf, f"{role}_token_id", None)) for role in ("bos", "eos", "pad")},
        )
    config.architectures = ["LlamaForCausalLM"]
    hf_config = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "_model_name_or_path")}
    student = StudentLM(StudentConfig.from_hf(hf_config))
    generator = torch.Generator().manual_seed(INIT_SEED)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)

    teacher_state = teacher_model.state_dict() if teacher_model is not None else {}
    state = {}
    if method == "teacher_layers":
        for new_index, old_index in enumerate(layers):
            prefix_old, prefix_new = f"model.layers.{old_index}.", f"model.layers.{new_index}."
            state.update({prefix_new + k[len(prefix_old):]: v for k, v in teacher_state.items() if k.startswith(prefix_old)})
        state["model.norm.weight"] = teacher_state["model.norm.weight"]
    embedding_init: dict = {"method": "fresh (normal, std 0.02)", "tied_lm_head": bool(config.tie_word_embeddings)}
    if method != "fresh":
        old_embed = teacher_state["model.embed_tokens.weight"]
        state["model.embed_tokens.weight"] = _with_tag_rows(old_embed, added_tags, vocab)
        if not config.tie_word_embeddings:
            state["lm_head.weight"] = _with_tag_rows(teacher_state.get("lm_head.weight", old_embed), added_tags, vocab)
        embedding_init = {
            "method": "teacher rows; a new tag's row is the mean of the teacher's rows of its teacher tokenization",
            "tied_lm_head": bool(config.tie_word_embeddings),
            "rows": {tag.text: {"id": tag.id, "teacher_ids": tag.teacher_ids} for tag in added_tags},
        }
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or (method == "teacher_layers" and [k for k in missing if not k.startswith(("halt_head.", "lm_head."))]):
        raise AssertionError(f"student init: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        student.lm_head.weight = student.model.embed_tokens.weight
    student.init_halt_head()

    record = StudentInit(
        teacher=teacher_name, teacher_family=tconf.model_type if tconf is not None else "api", method=method,
        teacher_layers=layers if method == "teacher_layers" else [],
        num_hidden_layers=config.num_hidden_layers, hidden_size=config.hidden_size, vocab_size=vocab,
        parameters=sum(p.numel() for p in student.parameters()), embedding_init=embedding_init, why=why,
    )
    return student.eval(), hf_config, record


def _with_tag_rows(old: torch.Tensor, added_tags, vocab: int) -> torch.Tensor:
    """The teacher's rows, each added tag's row at its id (the mean of its pieces' rows), zeros for any other new id."""
    rows = torch.zeros(vocab, old.shape[1], dtype=old.dtype)
    kept = min(old.shape[0], vocab)
    rows[:kept] = old[:kept]
    for tag in added_tags:
        rows[tag.id] = old[tag.teacher_ids].mean(dim=0)
    return rows

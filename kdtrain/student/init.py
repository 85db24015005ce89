"""Initialise a small student from the teacher: a few of its layers, embeddings resized.

Keeping the teacher's hidden size and taking evenly spread layers (first and last
included) gives a student that already produces sensible logit distributions, which is
what distillation starts from. Each new token's embedding row is the mean of the teacher
rows of the pieces the teacher splits it into, so ``<think>`` starts near ``<``+``think``+``>``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

DEFAULT_LAYERS = (0, 14, 29)


@dataclass(frozen=True)
class StudentInit:
    teacher: str
    teacher_layers: list[int]
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    parameters: int
    embedding_init: dict

    def to_json(self) -> dict:
        return asdict(self)


def init_student(teacher_model, added_tags, layers=DEFAULT_LAYERS, teacher_name: str = "teacher"):
    """Return (student ``LlamaForCausalLM``, :class:`StudentInit`) built from the teacher's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tconf = teacher_model.config
    if not layers or max(layers) >= tconf.num_hidden_layers or sorted(set(layers)) != list(layers):
        raise ValueError(f"student layers: expected increasing teacher layer indices < {tconf.num_hidden_layers}, found {layers}")
    config_dict = tconf.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.update(num_hidden_layers=len(layers), vocab_size=tconf.vocab_size + len(added_tags))
    config = LlamaConfig(**{k: v for k, v in config_dict.items() if k not in ("architectures", "transformers_version")})
    config.architectures = ["LlamaForCausalLM"]
    student = LlamaForCausalLM(config).eval()

    teacher_state = teacher_model.state_dict()
    state = {}
    for new_index, old_index in enumerate(layers):
        prefix_old, prefix_new = f"model.layers.{old_index}.", f"model.layers.{new_index}."
        for key, value in teacher_state.items():
            if key.startswith(prefix_old):
                state[prefix_new + key[len(prefix_old):]] = value
    state["model.norm.weight"] = teacher_state["model.norm.weight"]
    old_embed = teacher_state["model.embed_tokens.weight"]
    new_rows = torch.stack([old_embed[tag.teacher_ids].mean(dim=0) for tag in added_tags])
    state["model.embed_tokens.weight"] = torch.cat([old_embed, new_rows], dim=0)
    if not config.tie_word_embeddings:
        old_head = teacher_state["lm_head.weight"]
        head_rows = torch.stack([old_head[tag.teacher_ids].mean(dim=0) for tag in added_tags])
        state["lm_head.weight"] = torch.cat([old_head, head_rows], dim=0)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise AssertionError(f"student init: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        student.tie_weights()

    record = StudentInit(
        teacher=teacher_name,
        teacher_layers=list(layers),
        num_hidden_layers=len(layers),
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        parameters=sum(p.numel() for p in student.parameters()),
        embedding_init={
            "method": "mean of the teacher's embedding rows of the tag's teacher tokenization",
            "tied_lm_head": bool(config.tie_word_embeddings),
            "rows": {tag.text: {"id": tag.id, "teacher_ids": tag.teacher_ids} for tag in added_tags},
        },
    )
    return student, record

"""The export-friendly student: a Llama whose parameter names are transformers' own.

One file you can follow top to bottom (after nanoGPT). It loads a transformers Llama
checkpoint (the SmolLM2 teacher included) with no renaming, and adds a halt head. Three
entry points share the weights:

- ``forward(input_ids, attention_mask)``: full-sequence logits, for training and for the
  equivalence test against ``LlamaForCausalLM``;
- ``PrefillProgram`` / ``DecodeProgram`` (``kdtrain.export.programs``): static-shape
  programs with an explicit KV cache, for torch.export and Core ML.

Export rules kept here: ids are int32, no int64 reaches the mask or softmax, masks are
additive with ``MASK_MIN`` (finite in FP16, unlike -inf or float32's min), and softmax and
norm statistics are computed in the activations' dtype so converters can keep them FP32.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdtrain.errors import ArtifactError

MASK_MIN = -1.0e4  # additive mask: exp(-1e4) == 0 in FP32 and FP16, and -1e4 is finite in FP16
HALT_KEYS = ("halt_head.weight", "halt_head.bias")


@dataclass(frozen=True)
class StudentConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config: dict) -> "StudentConfig":
        """From a transformers ``LlamaConfig`` dict (``rope_theta`` or v5's ``rope_parameters``)."""
        rope = config.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ArtifactError(f"config.json: at rope_parameters.rope_type: expected 'default', found {rope['rope_type']!r}")
        values = dict(config, rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        values.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
        missing = [f.name for f in fields(cls) if f.name not in values]
        if missing:
            raise ArtifactError(f"config.json: at {missing[0]}: expected a Llama config key, found no such key")
        return cls(**{f.name: values[f.name] for f in fields(cls)})


def rope_tables(config: StudentConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [length, head_dim], in transformers' rotate-half layout."""
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # [L, hd/2]
    emb = torch.cat([angles, angles], dim=-1)  # [L, hd]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, T, hd]; cos, sin: [T, hd]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)  # the statistic precision_islands.yaml keeps FP32
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class Attention(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q: [B, nh, T, hd]; k, v: [B, nkv, T, hd] (rope applied to q and k)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.c.num_attention_heads, self.c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.c.num_key_value_heads, self.c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.c.num_key_value_heads, self.c.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q: [B, nh, T, hd]; k, v: [B, nkv, S, hd]; mask: additive [T, S] -> [B, T, hidden]."""
        b, _, t, _ = q.shape
        groups = self.c.num_attention_heads // self.c.num_key_value_heads
        s = k.shape[2]
        k = k[:, :, None].expand(b, self.c.num_key_value_heads, groups, s, self.c.head_dim).reshape(b, -1, s, self.c.head_dim)
        v = v[:, :, None].expand(b, self.c.num_key_value_heads, groups, s, self.c.head_dim).reshape(b, -1, s, self.c.head_dim)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.c.head_dim ** -0.5) + mask  # [B, nh, T, S]
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, nh, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x, cos, sin, mask, k_past=None, v_past=None, write=None, place=None):
        """-> (out [B, T, H], k, v). With a cache (B = 1), the new rows are blended into
        ``k_past``/``v_past`` [nkv, S, hd] where ``write`` [S, 1] is true, and k, v are the whole
        cache. Decode (T = 1) broadcasts its row; a T-token segment is placed by ``place`` [S, T],
        one-hot (an exact matmul: 1 x row + 0 x the others)."""
        q, k, v = self.project(x, cos, sin)
        if k_past is not None:
            if place is not None:
                k, v = torch.matmul(place, k[0]), torch.matmul(place, v[0])  # [nkv, S, hd]
            else:
                k, v = k[0], v[0]
            k = torch.where(write, k, k_past)[None]  # [1, nkv, S, hd]
            v = torch.where(write, v, v_past)[None]
        return self.attend(q, k, v, mask), k, v


class MLP(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h, cos, sin, mask, k_past=None, v_past=None, write=None, place=None):
        """-> (h, k, v); k and v are what the caller caches for this layer."""
        attn, k, v = self.self_attn(self.input_layernorm(h), cos, sin, mask, k_past, v_past, write, place)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class Backbone(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.config = c

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden state [B, T, H] after the norm (what the LM and halt heads read) for ids [B, T]."""
        t = input_ids.shape[1]
        cos, sin = rope_tables(self.config, t)
        pos = torch.arange(t, dtype=torch.int32)
        allowed = (pos[None, :] <= pos[:, None])[None]  # [1, T, T]
        if attention_mask is not None:
            allowed = torch.logical_and(allowed, attention_mask[:, None, :] > 0)  # [B, T, T]
        mask = torch.where(allowed, 0.0, MASK_MIN)[:, None]  # [B, 1, T, T]
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)[0]
        return self.norm(h)


class StudentLM(nn.Module):
    """Llama with transformers' parameter names plus a halt head (P(stop here))."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.halt_head = nn.Linear(config.hidden_size, 1)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_halt_head(self) -> None:
        """Start by predicting 'continue' (P(halt) ~ 0.018) so an untrained head never stops early."""
        nn.init.zeros_(self.halt_head.weight)
        nn.init.constant_(self.halt_head.bias, -4.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for ids [B, T]; right or left padding both handled by the mask."""
        return self.lm_head(self.model(input_ids, attention_mask))

    def halt_probability(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.halt_head(hidden)).squeeze(-1)

    # --- checkpoint: transformers' folder format ----------------------------------------

    @classmethod
    def from_pretrained(cls, folder: Path | str) -> "StudentLM":
        """Load ``config.json`` + ``model.safetensors``; every Llama weight must be present."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            config = StudentConfig.from_hf(json.loads((folder / "config.json").read_text(encoding="utf-8")))
            state = load_file(folder / "model.safetensors")
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{folder}: expected a transformers checkpoint (config.json, model.safetensors), found: {exc}") from None
        model = cls(config)
        if "lm_head.weight" not in state and config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        has_halt = all(k in state for k in HALT_KEYS)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k in HALT_KEYS and not has_halt)]
        if missing or unexpected:
            raise ArtifactError(f"{folder / 'model.safetensors'}: expected Llama weights, found missing {missing[:5]}, unexpected {unexpected[:5]}")
        if not has_halt:
            model.init_halt_head()
        return model.eval()

    def save_pretrained(self, folder: Path | str, hf_config: dict) -> None:
        """Write a folder ``LlamaForCausalLM.from_pretrained`` also reads (it ignores the halt head)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        state = {k: v.contiguous() for k, v in self.state_dict().items() if not (k == "lm_head.weight" and self.config.tie_word_embeddings)}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        config = dict(hf_config, kd_halt_head=True, kd_student=asdict(self.config))
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

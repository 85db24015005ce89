"""The on-device memory budget: weight, KV-cache and workspace bytes per student size and context.

Pure arithmetic from a Llama-family shape and the quant recipe (``runtime_budget.yaml``'s
formulas, written out in its header), so a user can size a 7B student before converting
one. The reference size is the exported student, and the plugin holds the arithmetic to
its real packages: the weight bytes to the MIL programs' weight constants, the KV bytes to
the states the runtime allocates. ``stage_runtime`` writes the table as the runtime config
the host reads (``max_sessions`` per size and context) and a plot of memory against context.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from kdcontracts.models.quant import Quantize, Recipe, Setting
from kdcontracts.models.runtime_budget import GIB, RuntimeBudgetContract, Shape
from kdtrain.quant.recipe import checkpoint_modules

FP16 = 2


def parameter_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    """Every parameter of the student (a Llama with a halt head), by transformers' name."""
    s, q, kv = shape, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    found: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s.vocab, s.hidden)}
    for i in range(s.layers):
        layer = f"model.layers.{i}"
        found |= {f"{layer}.self_attn.q_proj.weight": (q, s.hidden), f"{layer}.self_attn.k_proj.weight": (kv, s.hidden),
                  f"{layer}.self_attn.v_proj.weight": (kv, s.hidden), f"{layer}.self_attn.o_proj.weight": (s.hidden, q),
                  f"{layer}.mlp.gate_proj.weight": (s.intermediate, s.hidden), f"{layer}.mlp.up_proj.weight": (s.intermediate, s.hidden),
                  f"{layer}.mlp.down_proj.weight": (s.hidden, s.intermediate),
                  f"{layer}.input_layernorm.weight": (s.hidden,), f"{layer}.post_attention_layernorm.weight": (s.hidden,)}
    found |= {"model.norm.weight": (s.hidden,), "halt_head.weight": (1, s.hidden), "halt_head.bias": (1,)}
    if not s.tied:
        found["lm_head.weight"] = (s.vocab, s.hidden)
    return found


def _count(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _module_bytes(params: dict[str, tuple[int, ...]], setting: Setting | None) -> int:
    """A module's bytes in the package: FP16, or its weight quantized as ``setting`` says
    (INT8 data, an FP16 scale per output channel or one per tensor, an INT8 zero point each
    when asymmetric) with any other parameter kept FP16."""
    if not isinstance(setting, Quantize):
        return FP16 * sum(_count(d) for d in params.values())
    total = 0
    for name, dims in params.items():
        if not name.endswith(".weight"):
            total += FP16 * _count(dims)
            continue
        scales = dims[0] if setting.granularity == "per_channel" else 1
        total += _count(dims) * 1 + scales * (FP16 + (0 if setting.symmetric else 1))
    return total


def weight_bytes(shape: Shape, recipe: Recipe | None) -> int:
    """Bytes of the student's weights as converted: all FP16 (``recipe`` None), or as the recipe
    quantizes them. With tied embeddings, ``lm_head`` stands for the one shared matrix."""
    params = parameter_shapes(shape)
    by_module: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, dims in params.items():
        module = name.rsplit(".", 1)[0]
        by_module.setdefault("lm_head" if shape.tied and module == "model.embed_tokens" else module, {})[name] = dims
    settings = recipe.resolve(checkpoint_modules(params, shape.tied)) if recipe is not None else {}
    return sum(_module_bytes(p, settings.get(module)) for module, p in by_module.items())


def kv_bytes_per_token(shape: Shape, kv_bytes: int) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * kv_bytes


def workspace_bytes(shape: Shape, length: int, margin: float) -> int:
    """One request's prefill activations at ``length``: the widest per-token activations, one
    layer's FP16 attention scores, the last position's FP32 logits; times the margin."""
    s = shape
    per_token = 4 * s.hidden + 2 * s.intermediate + (s.heads + 2 * s.kv_heads) * s.head_dim
    return int((length * per_token * FP16 + s.heads * length * length * FP16 + s.vocab * 4) * margin)


@dataclass(frozen=True)
class Context:
    length: int
    kv_bytes_per_session: int
    workspace_bytes: int
    max_sessions: int  # 0: not even one session fits beside the weights and the reserve


@dataclass(frozen=True)
class SizeBudget:
    name: str
    source: str
    shape: Shape
    weights_int8: int
    weights_fp16: int
    kv_bytes_per_token: int
    contexts: tuple[Context, ...]

    def to_json(self) -> dict:
        return asdict(self)


def size_budget(contract: RuntimeBudgetContract, name: str, source: str, shape: Shape, recipe: Recipe) -> SizeBudget:
    int8, per_token = weight_bytes(shape, recipe), kv_bytes_per_token(shape, contract.kv_bytes)
    contexts = []
    for length in contract.contexts:
        per_session, workspace = per_token * length, workspace_bytes(shape, length, contract.workspace_margin)
        free = contract.device.available_bytes - int8 - workspace
        contexts.append(Context(length, per_session, workspace, max(0, free // per_session)))
    return SizeBudget(name, source, shape, int8, weight_bytes(shape, None), per_token, tuple(contexts))


def budget_table(contract: RuntimeBudgetContract, recipe: Recipe, reference: Shape) -> list[SizeBudget]:
    """Every size of the contract; ``reference``: the exported student's shape (the size whose source is ``artifacts``)."""
    return [size_budget(contract, s.name, s.source, reference if s.from_artifacts else s.shape, recipe) for s in contract.sizes]


def runtime_config(contract: RuntimeBudgetContract, table: list[SizeBudget]) -> dict:
    """What the host reads: the device, and per size and context the sessions it may keep."""
    d = contract.device
    return {"device": {"name": d.name, "memory_bytes": d.memory_bytes, "reserve_bytes": dict(d.reserve),
                       "available_bytes": d.available_bytes},
            "kv_bytes": contract.kv_bytes, "workspace_margin": contract.workspace_margin,
            "sizes": [s.to_json() for s in table]}


def table_lines(config: dict) -> list[str]:
    """The table as ``make demo`` prints it: one line per size and context."""
    lines = [f"memory budget on {config['device']['name']}: {config['device']['available_bytes'] / GIB:.1f} GiB after the reserve "
             f"({', '.join(f'{k} {v / GIB:g}' for k, v in config['device']['reserve_bytes'].items())} GiB)",
             f"{'size':14s} {'L':>5s} {'INT8 weights':>13s} {'KV/token':>9s} {'KV/session':>11s} {'workspace':>10s} {'sessions':>8s}"]
    for size in config["sizes"]:
        for c in size["contexts"]:
            lines.append(f"{size['name']:14s} {c['length']:5d} {size['weights_int8'] / GIB:9.3f} GiB {size['kv_bytes_per_token'] / 1024:6.0f} KiB "
                         f"{c['kv_bytes_per_session'] / GIB:7.3f} GiB {c['workspace_bytes'] / GIB:6.2f} GiB {c['max_sessions']:8d}")
    return lines


def reference_shape(folder) -> Shape:
    """The exported student's shape, from its ``config.json``."""
    checkpoint = folder.path(folder.exported_student())
    return Shape.from_hf(json.loads((checkpoint / "config.json").read_text(encoding="utf-8")))


def plot_memory(config: dict, path) -> None:
    """Memory of one session (weights + workspace + its KV cache) against context, per size, with
    the device's available memory; and the sessions that fit."""
    from kdtrain.plots import pyplot, save_png

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for size in config["sizes"]:
        lengths = [c["length"] for c in size["contexts"]]
        one = [(size["weights_int8"] + c["workspace_bytes"] + c["kv_bytes_per_session"]) / GIB for c in size["contexts"]]
        left.plot(lengths, one, marker="o", label=size["name"])
        right.plot(lengths, [c["max_sessions"] for c in size["contexts"]], marker="o", label=size["name"])
    left.axhline(config["device"]["available_bytes"] / GIB, color="k", linestyle="--", label="available after reserve")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context L (tokens)")
    left.set_ylabel("GiB: INT8 weights + workspace + one session's KV")
    left.set_yscale("log")
    right.set_ylabel("max concurrent sessions")
    right.set_yscale("symlog", linthresh=1)
    left.set_title(config["device"]["name"])
    right.set_title("sessions that fit")
    left.legend(fontsize=7)
    save_png(fig, path)


def stage_runtime(ctx) -> None:
    """``kdtrain pipeline --stages runtime``: the budget table as the runtime config, and its plot."""
    import logging

    from kdtrain import atomic
    from kdtrain.artifact_table import RUNTIME_CONFIG, RUNTIME_MEMORY_PLOT

    log, folder = logging.getLogger("kdtrain.runtime"), ctx.folder
    if not (ctx.contracts / "runtime_budget.yaml").exists():
        log.warning("stage runtime: %s has no runtime_budget.yaml, no runtime config written", ctx.contracts)
        return
    contract = ctx.contract("runtime_budget.yaml")
    recipe = ctx.contract("quant_recipe.yaml").recipe
    config = runtime_config(contract, budget_table(contract, recipe, reference_shape(folder)))
    atomic.write_json(folder.root / RUNTIME_CONFIG.path, config)
    folder.record(RUNTIME_CONFIG)
    plot_memory(config, folder.root / RUNTIME_MEMORY_PLOT.path)
    folder.record(RUNTIME_MEMORY_PLOT)
    for line in table_lines(config):
        log.info(line)
    folder.record_stage("runtime", {"device": contract.device.name, "sizes": [s.name for s in contract.sizes]})

"""A JSON summary of an exported graph: what the linter reads, and what lands in the artifacts.

Every node keeps its name, its op (``aten::softmax.int``), its inputs, the dtype and shape
of its output and the module it belongs to, so that a finding can name all of them, and
the plugin can lint from the artifacts folder without torch.export.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class GraphNode:
    name: str
    kind: str  # "placeholder", "call_function", "output", "get_attr"
    op: str  # aten op name for call_function ("aten::softmax.int"); the role for placeholders
    inputs: tuple[str, ...]
    dtype: str | None  # "float32", "int64", ...; None when the output is not one tensor
    shape: tuple[int, ...] | None
    module: str  # "model.layers.0.self_attn"; "" at the top level


@dataclass(frozen=True)
class GraphSummary:
    function: str
    length: int
    user_inputs: tuple[str, ...]
    user_outputs: tuple[str, ...]
    nodes: tuple[GraphNode, ...]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "GraphSummary":
        nodes = tuple(GraphNode(**{**n, "inputs": tuple(n["inputs"]), "shape": None if n["shape"] is None else tuple(n["shape"])}) for n in data["nodes"])
        return cls(data["function"], data["length"], tuple(data["user_inputs"]), tuple(data["user_outputs"]), nodes)

    @classmethod
    def load(cls, path: Path) -> "GraphSummary":
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.removeprefix("student.")  # programs wrap the student; paths match its checkpoint


def _op_name(node: torch.fx.Node, roles: dict[str, str]) -> str:
    if node.op == "placeholder":
        return roles.get(node.name, "placeholder")
    if node.op != "call_function":
        return node.op
    target = node.target
    if hasattr(target, "name") and callable(target.name):
        return target.name()
    return getattr(target, "__name__", str(target))


def _inputs(node: torch.fx.Node) -> tuple[str, ...]:
    found: list[str] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n.name))
    return tuple(found)


def summarize(graph: torch.fx.Graph, function: str, length: int, user_inputs=(), user_outputs=(), roles=None) -> GraphSummary:
    """Summarize an FX graph in its current node order (the linter checks that order)."""
    roles = roles or {}
    nodes = []
    for node in graph.nodes:
        val = node.meta.get("val")
        is_tensor = isinstance(val, torch.Tensor)
        nodes.append(GraphNode(
            name=node.name,
            kind=node.op,
            op=_op_name(node, roles),
            inputs=_inputs(node),
            dtype=str(val.dtype).removeprefix("torch.") if is_tensor else None,
            shape=tuple(int(d) for d in val.shape) if is_tensor else None,
            module=_module_path(node),
        ))
    return GraphSummary(function, length, tuple(user_inputs), tuple(user_outputs), tuple(nodes))


def summarize_program(program: torch.export.ExportedProgram, function: str, length: int) -> GraphSummary:
    sig = program.graph_signature
    roles = {name: "parameter" for name in sig.inputs_to_parameters}
    roles.update({name: "buffer" for name in sig.inputs_to_buffers})
    roles.update({name: "constant" for name in sig.inputs_to_lifted_tensor_constants})
    roles.update({name: "user_input" for name in sig.user_inputs})
    return summarize(program.graph, function, length, sig.user_inputs, sig.user_outputs, roles)

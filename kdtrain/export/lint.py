"""The graph linter: predicts, before conversion, what would fail or silently degrade on Core ML.

Rules (their settings, :class:`LintRules`, are ``contracts/export_lint.yaml``'s typed model):

1. ``convertible``: every aten op is in coremltools' own torch-frontend registry, looked up
   the way its converter does (``sanitize_op_kind``), so the list never goes stale; and no
   op is on the contract's denylist.
2. ``int64-path``: no int64 tensor on any path that reaches softmax, attention or the mask
   arithmetic (a dataflow walk over ancestors, not a name match).
3. ``topological-order``: every node's inputs are defined before it.
4. ``mask-dtype``: the mask arithmetic has one floating dtype and at most one cast; softmax
   inputs are floating point.
5. ``cast-budget``: the number of casts equals the recorded baseline (exporter drift).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from kdcontracts.models.export_lint import LintRules
from kdtrain.export.graph import GraphNode, GraphSummary

FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}


@dataclass(frozen=True)
class Finding:
    rule: str
    node: str
    op: str
    module: str
    message: str

    def __str__(self) -> str:
        where = self.module or "(top level)"
        return f"[{self.rule}] node {self.node!r} ({self.op}) in {where}: {self.message}"


@lru_cache(maxsize=None)
def _coreml_registry():
    from coremltools.converters.mil.frontend.torch.ops import _TORCH_OPS_REGISTRY
    from coremltools.converters.mil.frontend.torch.utils import sanitize_op_kind

    return _TORCH_OPS_REGISTRY, sanitize_op_kind


def op_kind(op: str) -> str:
    """coremltools' canonical name of an aten op (``aten::softmax.int`` -> ``softmax``)."""
    _, sanitize = _coreml_registry()
    return sanitize(op.replace("::", "."))


def _ancestors(nodes: dict[str, GraphNode], start: list[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        todo.extend(nodes[name].inputs)
    return seen


def _descendants(graph: GraphSummary, start: set[str]) -> set[str]:
    reached = set(start)
    for node in graph.nodes:  # in order: a node follows its inputs (rule 3 reports otherwise)
        if any(i in reached for i in node.inputs):
            reached.add(node.name)
    return reached


def lint(graph: GraphSummary, rules: LintRules) -> list[Finding]:
    registry, _ = _coreml_registry()
    nodes = {n.name: n for n in graph.nodes}
    calls = [n for n in graph.nodes if n.kind == "call_function"]
    findings: list[Finding] = []

    def add(rule: str, node: GraphNode, message: str) -> None:
        findings.append(Finding(rule, node.name, node.op, node.module, message))

    # 3. topological order
    defined: set[str] = set()
    for node in graph.nodes:
        late = [i for i in node.inputs if i not in defined]
        if late:
            add("topological-order", node, f"uses {late} before they are defined")
        defined.add(node.name)

    # 1. convertible
    for node in calls:
        kind = op_kind(node.op)
        if kind not in registry:
            add("convertible", node, f"coremltools {_coreml_version()} has no converter for {kind!r}")
        elif kind in rules.denylist:
            add("convertible", node, f"op {kind!r} is on the export-lint denylist")

    # 4. mask arithmetic: descendants of the mask inputs that are ancestors of a softmax
    softmaxes = [n for n in calls if op_kind(n.op) in ("softmax", "_softmax")]
    for node in softmaxes:
        source = nodes.get(node.inputs[0]) if node.inputs else None
        if source is not None and source.dtype not in FLOAT_DTYPES:
            add("mask-dtype", node, f"softmax input {source.name!r} is {source.dtype}, expected floating point")
    mask_inputs = {n for n in rules.mask_inputs if n in nodes}
    mask_nodes = _descendants(graph, mask_inputs) & _ancestors(nodes, [i for s in softmaxes for i in s.inputs])
    # Only the arithmetic built from positions and masks: not scores, not rope tables.
    mask_nodes -= _descendants(graph, {n.name for n in graph.nodes if n.op in ("parameter", "buffer", "constant")})
    mask_floats = sorted({nodes[n].dtype for n in mask_nodes if nodes[n].dtype in FLOAT_DTYPES})
    if len(mask_floats) > 1:
        first = next(nodes[n] for n in sorted(mask_nodes) if nodes[n].dtype == mask_floats[-1])
        add("mask-dtype", first, f"the mask arithmetic mixes {mask_floats}, expected one floating dtype")
    mask_casts = [nodes[n] for n in sorted(mask_nodes) if op_kind(nodes[n].op) in rules.cast_ops]
    if len(mask_casts) > 1:
        add("mask-dtype", mask_casts[-1], f"the mask is cast {len(mask_casts)} times ({[c.name for c in mask_casts]}), expected at most once")

    # 2. int64 on a path into softmax, attention or the mask
    sinks = [n for n in calls if op_kind(n.op) in rules.int64_sinks]
    guarded = _ancestors(nodes, [i for s in sinks for i in s.inputs]) | mask_nodes
    for name in sorted(guarded, key=lambda n: list(nodes).index(n)):
        node = nodes[name]
        if node.dtype == "int64":
            add("int64-path", node, "int64 tensor reaches softmax/attention/mask arithmetic; use int32 (Core ML has no int64 compute)")

    # 5. cast budget
    casts = [n for n in calls if op_kind(n.op) in rules.cast_ops]
    baseline = rules.cast_baseline.get(graph.function)
    if baseline is not None and len(casts) != baseline:
        anchor = casts[-1] if casts else graph.nodes[-1]
        add("cast-budget", anchor, f"casts per graph changed: baseline {baseline}, now {len(casts)} (exporter drift?)")
    return findings


def _coreml_version() -> str:
    import coremltools

    return coremltools.__version__

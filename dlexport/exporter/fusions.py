"""Standard fused operators (ONNX opset 23) for graphs that target opset-24 backends: the in-place layers.

torch.onnx writes an RMSNorm as seven nodes (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul) and each rotary
embedding as seven more (two Slices, Neg, Concat, two Muls, Add); ONNX Runtime's CPU optimiser fuses neither, and
at batch 1 a decode step is mostly those small nodes between the MatMuls. ONNX has had ``RMSNormalization`` and
``RotaryEmbedding`` since opset 23: ONNX Runtime runs them as one kernel each and TensorRT for RTX parses them (into
its normalisation and ``ROTARY_EMBEDDING`` layers). onnxscript's opset-23 fusions do the RMSNorm; its rotary rule
expects cos/sin computed inside the graph, while dlexport's layers take them as inputs from the embedding subgraph
(``rotary_cos``/``rotary_sin`` at full head width), so that one form is matched here with onnxscript's pattern API.

The portable flavour stays at opset 18 unfused (TensorRT 10.3 on JetPack 6 parses neither operator).
"""
from __future__ import annotations

import onnx_ir.passes.common as passes
from onnxscript.rewriter import onnx_fusions, pattern

FUSED_OPSET = 23


def fuse_standard_ops(model) -> None:
    """Fuse RMSNorm and rotary embedding in ``model`` (an ``onnx_ir.Model``, any opset >= 18) in place; the model
    imports opset 23 afterwards (none of its other operators changed meaning since 18)."""
    model.opset_imports[""] = FUSED_OPSET
    before = {id(n) for n in model.graph}
    onnx_fusions.fuse(model)
    pattern.RewriteRuleSet([_RotaryFromInputs.rule()]).apply_to_model(model)
    for p in (passes.RemoveUnusedNodesPass(), passes.CommonSubexpressionEliminationPass(),
              passes.RemoveUnusedNodesPass()):
        p(model)  # the rotary rule keeps the shared Unsqueezes of cos/sin alive until every match is rewritten
    _name_new_nodes(model, before)


def _name_new_nodes(model, before: set) -> None:
    """The rewriter names what it makes from process-wide counters; name it by graph position instead, so the same
    graph always gives the same file (the exporter's one-trace-per-structure files are compared byte for byte)."""
    outputs = {v.name for v in model.graph.outputs}
    for k, node in enumerate(n for n in model.graph if id(n) not in before):
        node.name = f"fused.{k}.{node.op_type}"
        for j, value in enumerate(node.outputs):
            if value.name not in outputs:
                value.name = f"fused.{k}.{j}"


def _values(v) -> list | None:
    c = None if v is None else v.const_value
    return None if c is None else c.numpy().reshape(-1).tolist()


class _RotaryFromInputs(pattern.RewriteRuleClassBase):
    """``x * Unsqueeze(cos, 1) + Concat(-x[..., h:], x[..., :h]) * Unsqueeze(sin, 1)`` (Hugging Face's
    ``apply_rotary_pos_emb`` with ``rotate_half``) for x [batch, heads, tokens, 2h] and cos/sin [batch, tokens, 2h]
    -> ``RotaryEmbedding(x, cos[..., :h], sin[..., :h])``. With partial rotary (Phi-3) x is the rotated slice of the
    head and cos/sin are as wide as it, so that slice is fused and the rest passes through as before."""

    def __init__(self):
        super().__init__("RotaryFromInputs", remove_nodes=False)  # q and k share the Unsqueezes of cos/sin

    def pattern(self, op, x, cos, sin, one1, one2, s1, e1, s2, e2, ax1, ax2, st1, st2):
        x1 = op.Slice(x, s1, e1, ax1, st1)
        x2 = op.Slice(x, s2, e2, ax2, st2)
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        return op.Add(op.Mul(x, op.Unsqueeze(cos, one1)), op.Mul(rotated, op.Unsqueeze(sin, one2)))

    def check(self, op, x, cos, sin, one1, one2, s1, e1, s2, e2, ax1, ax2, st1, st2, **_):
        result = pattern.MatchResult()
        if x.shape is None or x.shape.rank() != 4 or not isinstance(x.shape[3], int):
            return result.fail("x is not [batch, heads, tokens, head_dim] with a static head_dim", x)
        d = x.shape[3]
        half = d // 2
        if _values(one1) != [1] or _values(one2) != [1]:
            return result.fail("cos/sin are not unsqueezed at the heads axis")
        if not (_values(s1) == [0] and _values(e1) == [half] and _values(s2) == [half]
                and (_values(e2) or [0])[0] >= d and _values(ax1) in ([3], [-1]) and _values(ax2) in ([3], [-1])
                and _values(st1) == [1] and _values(st2) == [1]):
            return result.fail("not a rotate_half over the whole head")
        for t in (cos, sin):
            if t.shape is None or t.shape.rank() != 3 or t.shape[2] != d:
                return result.fail("cos/sin are not [batch, tokens, head_dim]", t)
        return result

    def rewrite(self, op, x, cos, sin, **_):
        zero, half, last = (op.Constant(value_ints=[v]) for v in (0, x.shape[3] // 2, -1))
        return op.RotaryEmbedding(x, op.Slice(cos, zero, half, last), op.Slice(sin, zero, half, last), interleaved=0)

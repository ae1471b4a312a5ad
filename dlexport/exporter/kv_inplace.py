"""The in-place KV flavour of a layer graph: the cache buffer is the layer's past *and* its present.

The portable layer (opset 18, parsed by TensorRT 10.3 on JetPack 6) takes a ``past`` of any length and returns only
the new tokens' key/values; fed the whole preallocated buffer, its ``Concat(past, new)`` copies the buffer and its
attention scans the buffer's capacity on every call. The in-place layer is the same graph rewritten (weights and
every other node untouched):

- ``past_key_values.N.key``/``.value`` is the whole buffer ``[batch, kv_heads, capacity, head_dim]``, and the new
  input ``past_length`` ``[batch]`` (int64) says how many slots are filled (the same for every row);
- ``present.N.key``/``.value`` is the buffer with the new tokens written at ``past_length`` by ONNX's
  ``TensorScatter`` (opset 24): bound to the input's memory it updates the cache in place (ONNX Runtime; TensorRT for
  RTX parses it into its ``KV_CACHE_UPDATE`` layer);
- attention reads ``Slice(present, 0, past_length + tokens)``: the mask is ``[batch, 1, tokens, past_length + tokens]``
  and every shape the graph took from ``past`` now comes from that filled length, so the cost of a call follows the
  filled length, not the capacity;
- grouped-query attention reads the filled key/values as they are: instead of repeating each KV head for its query
  heads (``Expand``: a copy of the filled cache per call, the largest cost of a decode step at long context), the
  query heads of a group are stacked as rows of one product with their KV head (``_grouped_attention``).
"""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ..contract import (CAPACITY, PAST_LENGTH, TensorSpec, past_key_name, past_value_name, present_key_name,
                        present_value_name)

OPSET = 24  # TensorScatter


def inplace_io(inputs: list[TensorSpec], outputs: list[TensorSpec], index: int) -> tuple[list, list]:
    """The in-place layer's I/O: cache buffers of ``capacity`` slots in and out, plus ``past_length``."""
    kv = (past_key_name(index), past_value_name(index), present_key_name(index), present_value_name(index))

    def buffer(s: TensorSpec) -> TensorSpec:
        return TensorSpec(s.name, (s.shape[0], s.shape[1], CAPACITY, s.shape[3]), s.dtype) if s.name in kv else s

    ins = [buffer(s) for s in inputs] + [TensorSpec(PAST_LENGTH, ("batch",), "int64")]
    return ins, [buffer(s) for s in outputs]


def make_inplace(path: Path, index: int) -> None:
    """Rewrite the portable layer graph at ``path`` (weights stay in their external data file) in place."""
    model = onnx.load(str(path), load_external_data=False)
    rewrite(model, index)
    onnx.save(model, str(path))


def rewrite(model: onnx.ModelProto, index: int) -> None:
    g = model.graph
    names = {n for n in _uses(g)} | {i.name for i in g.input} | {o.name for o in g.output}
    if PAST_LENGTH in names:
        raise ValueError("the layer graph is in-place already")
    nodes, head = list(g.node), []

    def const(name: str, values: list[int]) -> str:
        head.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                                      [len(values)], values)))
        return name

    # filled length (past_length + tokens) and past length, as 1-element shape tensors taken from the inputs
    head.append(helper.make_node("Shape", ["attention_mask"], ["kv.keys"], start=3, end=4))
    head.append(helper.make_node("Shape", ["hidden_states"], ["kv.tokens"], start=1, end=2))
    head.append(helper.make_node("Sub", ["kv.keys", "kv.tokens"], ["kv.past"]))
    zero, two = const("kv.zero", [0]), const("kv.axis2", [2])
    tail = []
    for past, present in ((past_key_name(index), present_key_name(index)),
                          (past_value_name(index), present_value_name(index))):
        new = f"kv.new.{present}"
        _rename(nodes, present, new)  # the graph's new key/values become an internal value
        filled = f"kv.filled.{present}"
        tail.append(helper.make_node("TensorScatter", [past, new, PAST_LENGTH], [present], axis=2))
        tail.append(helper.make_node("Slice", [present, zero, "kv.keys", two], [filled]))
        kept = []
        for node in nodes:
            if past not in node.input:
                kept.append(node)
            elif node.op_type == "Concat" and list(node.input) == [past, new] and _attr(node, "axis") in (2, -2):
                _rename(nodes, node.output[0], filled)  # attention reads the filled part of the updated buffer
            elif node.op_type == "Shape":
                kept.extend(_past_shape(node, past))  # the filled length, not the buffer's capacity
            else:
                raise ValueError(f"unexpected use of {past} by a {node.op_type} node: cannot make it in-place")
        nodes = kept
    # the scatter and slices feed the attention: put them before the first node that reads the filled values
    order = head + _topological(nodes, tail)
    kv_heads, head_dim = (next(i for i in g.input if i.name == past_key_name(index)).type.tensor_type.shape.dim[d]
                          .dim_value for d in (1, 3))
    order = _grouped_attention(order, g, f"kv.filled.{present_key_name(index)}",
                               f"kv.filled.{present_value_name(index)}", kv_heads, head_dim)
    del g.node[:]
    g.node.extend(order)
    g.input.append(helper.make_tensor_value_info(PAST_LENGTH, TensorProto.INT64, ["batch"]))
    for value in list(g.input) + list(g.output):
        if value.name in (past_key_name(index), past_value_name(index), present_key_name(index),
                          present_value_name(index)):
            value.type.tensor_type.shape.dim[2].dim_param = CAPACITY
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, OPSET)
    model.ir_version = max(model.ir_version, 11)


def _grouped_attention(nodes: list, g, key: str, value: str, kv_heads: int, head_dim: int) -> list:
    """``MatMul(Q, Transpose(Reshape(Expand(Unsqueeze(K)))))`` and ``MatMul(P, Reshape(Expand(Unsqueeze(V))))``
    (HF's ``repeat_kv``) -> the same products with the ``heads / kv_heads`` query heads of each group as rows:
    ``Reshape(MatMul(Reshape(Q, [b, kv_heads, -1, d]), Transpose(K)), [b, heads, -1, L])``, likewise for V. Query
    head ``h`` reads KV head ``h // (heads / kv_heads)`` in both. A graph without that pattern is left as it is."""
    consts = {i.name: i for i in g.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in nodes if n.op_type == "Constant" and n.attribute})
    users: dict[str, list] = {}
    for n in nodes:
        for x in n.input:
            users.setdefault(x, []).append(n)
    producer = {o: n for n in nodes for o in n.output}

    def only_user(name, op):
        us = users.get(name, [])
        return us[0] if len(us) == 1 and us[0].op_type == op else None

    def chain(start, ops):
        out, cur = [], start
        for op in ops:
            node = only_user(cur, op)
            if node is None:
                return None
            out.append(node)
            cur = node.output[0]
        return out

    k_chain, v_chain = chain(key, ["Unsqueeze", "Expand", "Reshape", "Transpose", "MatMul"]), \
        chain(value, ["Unsqueeze", "Expand", "Reshape", "MatMul"])
    if not (k_chain and v_chain) or _attr(k_chain[3], "perm") != [0, 1, 3, 2] or k_chain[4].input[1] != \
            k_chain[3].output[0] or v_chain[3].input[1] != v_chain[2].output[0]:
        return nodes
    target = producer.get(k_chain[2].input[1])  # Concat([b], [heads], [L], [d])
    if target is None or target.op_type != "Concat" or target.input[1] not in consts:
        return nodes
    from onnx import numpy_helper

    (heads,) = numpy_helper.to_array(consts[target.input[1]]).tolist()
    shapes = {"q": [0, kv_heads, -1, head_dim], "scores": [0, heads, -1, 0], "probs": [0, kv_heads, -1, 0],
              "out": [0, heads, -1, head_dim]}
    made = [helper.make_node("Constant", [], [f"{key}.gqa.{k}"], value=helper.make_tensor(
        f"{key}.gqa.{k}", TensorProto.INT64, [4], v)) for k, v in shapes.items()]
    qk, pv = k_chain[4], v_chain[3]
    t = f"{key}.gqa"
    grouped = {
        id(qk): [helper.make_node("Transpose", [key], [f"{t}.kt"], perm=[0, 1, 3, 2]),
                 helper.make_node("Reshape", [qk.input[0], f"{t}.q"], [f"{t}.qg"]),
                 helper.make_node("MatMul", [f"{t}.qg", f"{t}.kt"], [f"{t}.sg"]),
                 helper.make_node("Reshape", [f"{t}.sg", f"{t}.scores"], list(qk.output))],
        id(pv): [helper.make_node("Reshape", [pv.input[0], f"{t}.probs"], [f"{t}.pg"]),
                 helper.make_node("MatMul", [f"{t}.pg", value], [f"{t}.og"]),
                 helper.make_node("Reshape", [f"{t}.og", f"{t}.out"], list(pv.output))],
    }
    dropped = {id(n) for n in k_chain[:4] + v_chain[:3]}
    out = made[:]
    for n in nodes:
        if id(n) not in dropped:
            out.extend(grouped.get(id(n), [n]))
    outputs = {v.name for v in g.output}
    while True:  # drop what only computed the repeat's shapes
        used = {x for n in out for x in n.input} | outputs
        kept = [n for n in out if any(o in used for o in n.output)]
        if len(kept) == len(out):
            return out
        out = kept


def _past_shape(node, past: str) -> list:
    """Shape(past)[start:end] with dim 2 replaced by the filled past length."""
    start, end, out = _attr(node, "start") or 0, _attr(node, "end"), node.output[0]
    pieces = []
    for d in range(start, 4 if end is None else end):
        if d == 2:
            pieces.append("kv.past")
        else:
            pieces.append(f"{out}.dim{d}")
            yield helper.make_node("Shape", [past], [pieces[-1]], start=d, end=d + 1)
    yield helper.make_node("Concat", pieces, [out], axis=0)


def _attr(node, name: str):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _uses(g):
    for n in g.node:
        yield from n.input
        yield from n.output


def _rename(nodes, old: str, new: str) -> None:
    """Rename a value among the nodes (graph inputs/outputs keep their names: the caller re-produces them)."""
    for n in nodes:
        for seq in (n.input, n.output):
            for k, x in enumerate(seq):
                if x == old:
                    seq[k] = new


def _topological(nodes: list, extra: list) -> list:
    """Nodes in an order where every input is produced first (graph inputs and initializers count as produced)."""
    produced_by = {o: n for n in nodes + extra for o in n.output}
    done, order, seen = set(), [], set()

    def visit(n):
        if id(n) in done:
            return
        if id(n) in seen:
            raise ValueError("cycle in the layer graph")
        seen.add(id(n))
        for x in n.input:
            if x in produced_by:
                visit(produced_by[x])
        done.add(id(n))
        order.append(n)

    for n in nodes + extra:
        visit(n)
    return order

"""A cheap draft head cut from an export's head.onnx: the LM head restricted to a subset of the vocabulary.

Self-speculative drafts pay the exit head every drafted token; on small models its [hidden, vocab] projection costs
as much as several layers (SmolLM2-135M: about 8). Drafting only needs the tokens the model actually picks, so the
final projection keeps just the subset's columns (graph surgery on the exported head: every other node and weight
is untouched) and the graph outputs logits over the subset. The subset's token ids travel in the file's metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError

TOKEN_IDS_KEY = "dlexport.draft_token_ids"


def subset_head(head_path: Path, token_ids, out: Path) -> None:
    """Write ``out``: ``head_path`` with its final projection cut to the columns ``token_ids`` (sorted, unique)."""
    import onnx
    from onnx import numpy_helper

    ids = np.asarray(sorted({int(t) for t in token_ids}), dtype=np.int64)
    model = onnx.load(str(head_path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    vocab = g.output[0].type.tensor_type.shape.dim[-1].dim_value
    projection = next((n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits
                       and list(inits[n.input[1]].dims)[-1:] == [vocab]), None)
    if projection is None or not vocab:
        raise InputError(f"{head_path}: the head's final projection is not a MatMul by a [hidden, {vocab or '?'}] "
                         "weight (a quantised head?): make the draft head from the fp32 or fp16 export")
    if ids.size == 0 or ids[0] < 0 or ids[-1] >= vocab:
        raise InputError(f"draft head token ids must lie in 0..{vocab - 1}, got {ids.size} ids")
    users = sum(name == projection.input[1] for n in g.node for name in n.input)
    weight = inits[projection.input[1]]
    sliced = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight)[..., ids]),
                                     f"{weight.name}_draft_subset")
    if users == 1:
        g.initializer.remove(weight)
    g.initializer.append(sliced)
    projection.input[1] = sliced.name
    g.output[0].type.tensor_type.shape.dim[-1].dim_value = int(ids.size)
    del g.value_info[:]  # intermediate shapes after the projection changed; none are needed to run the graph
    entry = next((p for p in model.metadata_props if p.key == TOKEN_IDS_KEY), None) or model.metadata_props.add()
    entry.key, entry.value = TOKEN_IDS_KEY, json.dumps(ids.tolist())
    onnx.checker.check_model(model)
    tmp = out.with_name(f".{out.name}.partial")
    onnx.save(model, str(tmp))
    tmp.replace(out)


def token_ids(path: Path) -> list[int]:
    """The subset's token ids, read from the draft head's metadata (the weights are not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entry = next((p.value for p in model.metadata_props if p.key == TOKEN_IDS_KEY), None)
    if entry is None:
        raise InputError(f"{path} is not a dlexport draft head (no {TOKEN_IDS_KEY} metadata): re-run "
                         "`dlexport plan calibrate-draft`")
    return json.loads(entry)

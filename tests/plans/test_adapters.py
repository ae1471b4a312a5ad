import json

import numpy as np
import pytest
import torch

from dlexport.engines.onnxruntime import OrtConfig
from dlexport.engines.onnxruntime.loader import create_session
from dlexport.plans.adapters import export_adapter, fit_adapters
from dlexport.plans.calibrate import calibrate_exit
from dlexport.plans.exits import collect_signals
from dlexport.plans.stack import Stack
from dlexport.runtime import Runtime, load_plan
from dlexport.runtime.plan import PlanError


def _ids(batch, tokens, seed):
    return torch.randint(0, 512, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def test_adapter_onnx_matches_torch(tiny_llama_model, tmp_path):
    stack = Stack(tiny_llama_model.model)
    adapter = fit_adapters(stack, _ids(8, 32, 0), [1])[1]
    entry = export_adapter(stack, adapter, 1, tmp_path)
    assert entry["file"] == "adapters/exit_01.onnx" and len(entry["sha256"]) == 64
    x = torch.randn(3, 7, stack.hidden_size)
    got = create_session(tmp_path / entry["file"], OrtConfig()).run(None, {"hidden_states": x.numpy()})[0]
    np.testing.assert_allclose(got, adapter(x).detach().numpy(), atol=1e-5)


def test_adapters_raise_agreement_on_their_own_text(tiny_opt_model):
    stack = Stack(tiny_opt_model.model)
    ids = _ids(16, 32, 1)
    raw = collect_signals(stack, ids).agree.float().mean(1)
    tuned = collect_signals(stack, ids, fit_adapters(stack, ids, [0, 1, 2])).agree.float().mean(1)
    assert (tuned[:3] > raw[:3]).all()


def test_plan_with_adapters_runs_and_refuses_altered_files(tiny_opt_export, tiny_opt_model, small_text, tmp_path):
    out = tmp_path / "plans" / "exit.json"
    plan = calibrate_exit(tiny_opt_export.folder, out, target_agreement=0.6, head_cost=0.05, text=small_text,
                          adapters=True, adapter_seqs=8, loaded=tiny_opt_model, progress=False, log=lambda *a: None)
    assert plan.exit is not None and {a.layer for a in plan.exit.adapters} == set(plan.exit.layers)
    runtime = Runtime.load(tiny_opt_export.folder)
    loaded = load_plan(out, runtime.manifest)
    layer = loaded.exit.layers[0]
    hidden = torch.randn(1, 1, tiny_opt_export.arch["hidden_size"])
    assert not torch.allclose(runtime.exit_head(layer, hidden, loaded.exit), runtime.head(hidden))
    assert len(runtime.generate([[5, 6, 7, 8]], 8, loaded).tokens[0]) == 8

    path = out.parent / loaded.exit.adapters[0].file
    original = path.read_bytes()
    path.write_bytes(original + b"\0")
    with pytest.raises(PlanError, match="sha256") as altered:
        load_plan(out)
    path.unlink()
    with pytest.raises(PlanError, match="missing") as missing:
        load_plan(out)

    outside = tmp_path / "outside.onnx"  # the right bytes, but outside the plan's folder
    outside.write_bytes(original)
    path.symlink_to(outside)
    with pytest.raises(PlanError) as via_link:
        load_plan(out)
    path.unlink()
    data = json.loads(out.read_text())
    file = data["exit"]["adapters"][0]["file"]
    for escape in ("../outside.onnx", str(outside)):
        data["exit"]["adapters"][0]["file"] = escape
        out.write_text(json.dumps(data))
        with pytest.raises(PlanError) as escaped:
            load_plan(out)
        assert str(escaped.value).replace(repr(escape), repr(file)) == str(missing.value)
    assert str(altered.value) == str(missing.value) == str(via_link.value)  # one message: no probing of paths
    data["exit"]["adapters"][0]["file"] = file
    data["exit"]["adapters"][0]["layer"] = 99
    out.write_text(json.dumps(data))
    with pytest.raises(PlanError):
        load_plan(out)

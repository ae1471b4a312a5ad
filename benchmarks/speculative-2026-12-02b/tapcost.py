"""Plain decode on SmolLM2's full layer group with some tap outputs bound against none (same weights, interleaved).

    python benchmarks/speculative-2026-12-02b/tapcost.py EXPORT ~/.cache/dlexport/groups/layers_00-29-<sha> 1,2,...,29

Writes group-N.onnx / group-0.onnx next to the cached group.onnx (same external data). Measured 2026-12-02, 1 thread,
8 prompts x 64 tokens x 2 rounds: 29 taps 1.011x, 7 taps 1.006x the speed of none.
"""
import sys, torch, onnx
from pathlib import Path
from dlexport.runtime import Runtime
from dlexport.engines.onnxruntime import OrtEngine
from dlexport.tools.prompts import prose_prompts
torch.set_num_threads(1)
folder = Path(sys.argv[2]); keep = {f"hidden_states_out.{k}" for k in sys.argv[3].split(",") if k}
m = onnx.load(str(folder / "group.onnx"), load_external_data=False)
outs = [o for o in m.graph.output if not o.name.startswith("hidden_states_out.") or o.name in keep]
del m.graph.output[:]; m.graph.output.extend(outs)
name = f"group-{len(keep)}.onnx"; onnx.save(m, str(folder / name))
rts = {}
for label, file in (("some", name), ("none", None)):
    rt = Runtime.load(sys.argv[1], threads=1)
    g = rt.engines["layers_00-29"]
    if file is None:
        m2 = onnx.load(str(folder / "group.onnx"), load_external_data=False)
        o2 = [o for o in m2.graph.output if not o.name.startswith("hidden_states_out.")]
        del m2.graph.output[:]; m2.graph.output.extend(o2); onnx.save(m2, str(folder / "group-0.onnx")); file = "group-0.onnx"
        specs = [o for o in g.outputs if not o.name.startswith("hidden_states_out.")]
    else:
        specs = [o for o in g.outputs if not o.name.startswith("hidden_states_out.") or o.name in keep]
    e = OrtEngine(g.name, folder / file, g.inputs, specs, g.config); e.layers = g.layers
    rt.engines[g.name] = e; rt._groups = {}; rt._add_group(e); rts[label] = rt
prompts = [p["ids"] for p in prose_prompts(8, 64, rts["some"].tokenizer)]
tot = {k: 0.0 for k in rts}
for rep in range(3):
    for i, p in enumerate(prompts):
        order = list(rts) if i % 2 == 0 else list(rts)[::-1]
        outs = {}
        for k in order:
            r = rts[k].generate([p], 64, stop_tokens=[]); outs[k] = r.tokens
            if rep: tot[k] += r.total_s
        assert outs["some"] == outs["none"]
print(len(keep), "taps:", {k: round(v, 3) for k, v in tot.items()}, "speed vs none", round(tot["none"] / tot["some"], 4))

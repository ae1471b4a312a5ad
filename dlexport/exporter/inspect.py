"""A readable summary of an export folder's manifest and files."""
from __future__ import annotations

from pathlib import Path

from ..manifest import Manifest


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _io(specs) -> str:
    return ", ".join(f"{s['name']}[{','.join(map(str, s['shape']))}]" for s in specs)


def describe(folder: Path) -> str:
    m = Manifest.load(folder)
    a = m.arch
    subs = m.data["subgraphs"]
    total = sum(f["size"] for s in subs.values() for f in s["files"])
    lines = [
        f"export {folder}",
        f"  source       {m.data['source']}  (fingerprint {m.fingerprint})",
        f"  architecture {a['model_type']}: {a['num_layers']} layers, hidden {a['hidden_size']}, heads "
        f"{a['num_heads']} (kv {a['num_kv_heads']}), head dim {a['head_dim']}, vocab {a['vocab_size']}, "
        f"context {a['max_positions']}",
        f"  dtype        {m.dtype}, opset {m.data['opset']}, {len(subs)} subgraphs, {_mb(total)}",
        f"  tokenizer    {m.data.get('tokenizer') or 'none'}",
    ]
    for name in ("embed", m.layer_key(0), "head"):
        s = subs[name]
        lines.append(f"  {name:10s} in: {_io(s['inputs'])}")
        lines.append(f"  {'':10s} out: {_io(s['outputs'])}")
    windows = a.get("layer_windows") or [None] * a["num_layers"]
    if any(w is not None for w in windows):
        kinds = {}
        for i, w in enumerate(windows):
            kinds.setdefault(w, []).append(str(i))
        kind = {w: f"sliding window of {w}" if w else "global" for w in kinds}
        lines.append("  attention    " + "; ".join(f"layers {', '.join(ls)}: {kind[w]}" for w, ls in kinds.items()))
    rotary = {tuple(x["name"] for x in subs[m.layer_key(i)]["inputs"] if x["name"].startswith("rotary_"))
              for i in range(a["num_layers"])}
    if a["num_layers"] > 1:
        same = "the same I/O" if len(rotary) <= 1 else "the same I/O but the rotary pair of their kind"
        lines.append(f"  ({a['num_layers'] - 1} more layers with {same}, indices in the names)")
    q = m.data.get("quantization")
    if q:
        st, quality = q["settings"], q.get("quality")
        embed = "" if st.get("embed_weights", "keep") == "keep" else f", embedding {st['embed_weights']}"
        lines.append(f"  weights      {st['weights']} (head {st['head_weights']}{embed}), {st['format']}, {st['method']}, block "
                     f"{st['block_size']}, {'symmetric' if st['symmetric'] else 'asymmetric'}, accuracy level "
                     f"{st['accuracy_level']}; from {q['source_export']}")
        lines.append("  quality      " + (f"perplexity {quality['perplexity']['quantized']:.3f} vs "
                                          f"{quality['perplexity']['reference']:.3f}, top-1 agreement "
                                          f"{quality['agreement']:.4f} on {quality['tokens']} held-out tokens"
                                          if quality else "not measured (`dlexport validate DIR`)"))
        return "\n".join(lines)
    v = m.data.get("validation")
    if v:
        worst = max(v["subgraphs"], key=lambda c: c["max_abs_diff"] / c["tolerance"])
        lines.append(f"  validation   {'passed' if v['ok'] else 'FAILED'}: worst {worst['subgraph']}/{worst['case']} "
                     f"{worst['max_abs_diff']:.2e} (tol {worst['tolerance']:.1e}); end to end: "
                     f"{v['end_to_end']['result']}")
    else:
        lines.append("  validation   not run (`dlexport validate DIR`)")
    return "\n".join(lines)

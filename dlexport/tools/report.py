"""Benchmark outputs: ``bench.json`` (everything), ``bench.md`` (the table the README quotes), ``bench.png``
(speed relative to the full model against the fraction of layers executed)."""
from __future__ import annotations

from pathlib import Path

from ..files import OwnedFolder, write_json_atomic
from .bench import BenchResult


def _ms(d: dict) -> str:
    return f"{d['median']:.1f} / {d['p90']:.1f}"


def markdown(result: BenchResult) -> str:
    c = result.config
    dev = c["device"]
    lines = [
        f"# dlexport bench: {c['model']['source']} ({c['model']['num_layers']} layers, {c['model']['dtype']})",
        "",
        f"- device: {dev.get('name')} ({dev.get('kind')}), threads: {c['threads']}, batch 1, greedy",
        f"- prompt {c['prompt_tokens']} tokens / {c['new_tokens']} new tokens, {c['repeats']} interleaved rounds "
        f"(+{c['warmup_rounds']} warm-up), prompts: " + ", ".join(sorted({Path(p['source']).name for p in c['prompts']})),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in c["versions"].items()),
        f"- measured {c['created']}" + (f" with `{c['command']}`" if c.get("command") else ""),
        "",
        "Speeds are medians over rounds; \"vs full\" is the median of per-round ratios to the full model run in the "
        "same round. Times are median / p90.",
        "",
    ]
    predicted = any("predicted" in r for r in result.runs.values())
    head = ["run", "layers/token", "tokens/s", "vs full", "TTFT ms", "decode ms/token", "greedy tokens"]
    if predicted:
        head[6:6] = ["predicted decode ms/token", "outside engines"]
        head[4:4] = ["predicted vs full"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in result.runs.items():
        tokens = ("same as full" if r["same_tokens_as_full"] else f"{r['token_agreement_with_full']:.0%} agree")
        if r["expected_same_tokens"] and not r["same_tokens_as_full"]:
            tokens += " (EXPECTED IDENTICAL)"
        row = [name, f"{r['layers_per_token']:.1f}", f"{r['tokens_per_s']['median']:.1f}",
               f"{r['speed_vs_full']['median']:.2f}x", _ms(r["ttft_ms"]), _ms(r["decode_ms_per_token"]), tokens]
        if predicted:
            p = r.get("predicted")
            row[6:6] = [f"{p['decode_ms_per_token']:.1f}" if p else "-", _outside(p, r)]
            row[4:4] = [f"{p['speed_vs_full']:.2f}x" if p else "-"]
        lines.append("| " + " | ".join(row) + " |")
    if predicted:
        lines += ["", f"Predicted costs come from `{c['profile']['path']}` ({c['profile']['tool']} profile): embedding "
                  "+ the run's layers + head per step, each engine timed through the engine interface in model "
                  "order; decode is priced at the cache capacity (portable layers) or at the mean filled length "
                  "(in-place layers). \"outside engines\" is the share of the measured decode time the prediction "
                  "does not cover: the runtime's own per-step work (masks, bindings, sampling, emitting)."]
    return "\n".join(lines) + "\n"


def _outside(predicted: dict | None, run: dict) -> str:
    if not predicted:
        return "-"
    measured = run["decode_ms_per_token"]["median"]
    return f"{(measured - predicted['decode_ms_per_token']) / measured:.1%}" if measured else "-"


def plot(result: BenchResult, path: Path, table=None, manifest=None) -> None:
    """Speed relative to the full model vs the fraction of layers each token ran; the profile's prediction as a
    line when a cost table is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result.config
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, r in result.runs.items():
        x, y = r["fraction_of_layers"], r["speed_vs_full"]["median"]
        marker = {"hf": "s", "onnx-mono": "D", "full": "o"}.get(r["kind"], "^")
        ax.scatter([x], [y], marker=marker, s=50, zorder=3)
        ax.annotate(f"{name} ({r['tokens_per_s']['median']:.1f} tok/s)", (x, y), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    if table is not None and manifest is not None:
        from .bench import predictions

        n = manifest.num_layers
        sets = {str(k): tuple(range(k)) for k in range(1, n + 1)}  # layer costs are alike: which k barely matters
        pred = predictions(table, sets, manifest, c["prompt_tokens"], c["new_tokens"])
        full = pred[str(n)]["tokens_per_s"]
        ax.plot([k / n for k in range(1, n + 1)], [pred[str(k)]["tokens_per_s"] / full for k in range(1, n + 1)],
                "--", color="gray", label="predicted from profile.json")
        ax.legend(fontsize=8)
    ax.set_xlabel("fraction of decoder layers executed per token")
    ax.set_ylabel("tokens/s relative to the full model (same run)")
    ax.set_xlim(0, 1.1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"{c['model']['source']}, {c['device'].get('kind')}, {c['threads']} thread(s), "
                 f"{c['prompt_tokens']}+{c['new_tokens']} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(result: BenchResult, out_dir: Path | str, table=None, manifest=None) -> dict[str, Path]:
    """bench.json, bench.md and bench.png in ``out_dir``: new, empty, or a bench folder of the same model."""
    out = Path(out_dir)
    own = OwnedFolder.claim(out, "bench", manifest.fingerprint if manifest is not None else None, overwrite=None,
                            inputs=[manifest.folder] if manifest is not None else [])
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "bench.png"}
    own.add(*(p.name for p in paths.values()))
    write_json_atomic(paths["json"], result.to_json())
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["plot"], table, manifest)
    return paths

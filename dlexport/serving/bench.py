"""Throughput and latency through a real tritonserver: concurrent clients, plans, dynamic batching on vs off.

One server holds two models on the same folder, ``batched`` (dynamic batching) and ``single`` (none), one instance
each; every point (plan x clients) runs on both, back to back, so the ratio comes from one interleaved run. Each
client sends its requests one after another (a closed loop); throughput is generated tokens over the point's wall
time, latency is per request (send to whole answer). The outputs of the two models must be identical request for
request (the batched path is exact); the benchmark refuses to report otherwise.
"""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from ..errors import InputError
from ..files import OwnedFolder, write_json_atomic
from ..tools.prompts import prose_prompts
from ..tools.stats import percentile
from .client import connect, generate
from .repository import RepoSettings, folder_manifest, write_repository
from .server import Server

MODELS = {"batched": True, "single": False}


def run_point(url: str, model: str, prompts: list, clients: int, requests: int, new_tokens: int,
              plan: str | None, protocol: str = "grpc") -> dict:
    """``clients`` threads, each sending ``requests`` requests in turn (client c sends prompts[c*requests + r])."""
    latencies, outputs, errors = [], {}, []
    lock, start = threading.Lock(), threading.Barrier(clients + 1)

    def client(c):
        conn = connect(url, protocol)
        start.wait(timeout=60)
        for r in range(requests):
            i = c * requests + r
            t0 = time.perf_counter()
            try:
                reply = generate(conn, prompts[i % len(prompts)], new_tokens, model=model, plan=plan)
            except Exception as e:  # noqa: BLE001 - reported below, the point is not valid
                errors.append(f"{type(e).__name__}: {e}")
                return
            with lock:
                latencies.append((time.perf_counter() - t0) * 1e3)
                outputs[i] = (reply.tokens, reply.mean_layers)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait(timeout=60)
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed at {clients} clients on {model}: {errors[0]}")
    tokens = sum(len(t) for t, _ in outputs.values())
    return {"model": model, "plan": plan or "full", "clients": clients, "requests": len(latencies),
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "mean_layers": sum(m for _, m in outputs.values()) / len(outputs),
            "outputs": {str(i): t for i, (t, _) in sorted(outputs.items())}}


def bench(folder: Path | str, out: Path | str, plans: dict[str, Path], *, clients=(1, 4, 16), requests=None,
          new_tokens: int = 16, prompt_tokens: int = 32, threads: int | None = None, log=print) -> dict:
    """Run every point, write serve.json / serve.md / serve.png into ``out`` (new, or a folder of this kind)."""
    manifest = folder_manifest(folder)
    requests = requests or {1: 4, 4: 2, 16: 2}
    own = OwnedFolder.claim(out, "serve bench", manifest.fingerprint, overwrite=None, inputs=[manifest.folder])
    tokenizer = None
    if manifest.tokenizer_dir() is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(manifest.tokenizer_dir())
    count = max(c * requests[c] for c in clients)
    prompts = [p["ids"] for p in prose_prompts(count, prompt_tokens, tokenizer, manifest.arch["vocab_size"])]
    points = []
    with tempfile.TemporaryDirectory(prefix="dlexport-serve-bench-") as tmp:
        repo = Path(tmp) / "repo"
        for name, batching in MODELS.items():
            write_repository(manifest.folder, repo, RepoSettings(name=name, batching=batching, threads=threads,
                                                                 plans=plans, max_new_tokens=new_tokens))
        with Server(repo) as server:
            log(f"server ready at {server.grpc_url} (log {server.log})")
            for plan in [None, *plans]:
                for model in MODELS:  # warm-up: first calls allocate
                    generate(connect(server.grpc_url, "grpc"), prompts[0], new_tokens, model=model, plan=plan)
                for c in clients:
                    for model in MODELS:
                        p = run_point(server.grpc_url, model, prompts, c, requests[c], new_tokens, plan)
                        log(f"{p['plan']:>8} {c:>2} clients {model:>7}: {p['tokens_per_s']:6.1f} tokens/s, p50 "
                            f"{p['p50_ms']:6.0f} ms, p99 {p['p99_ms']:6.0f} ms")
                        points.append(p)
            text = generate(connect(server.http_url, "http"), "The GNU General Public License is", new_tokens,
                            model="batched").text if tokenizer is not None else ""  # the text path, once
    for a, b in zip(points[::2], points[1::2]):
        if a["outputs"] != b["outputs"]:
            raise InputError(f"batched and single outputs differ at {a['plan']}, {a['clients']} clients: the batched "
                             "path is not exact here; this is a bug to report")
    result = {"folder": str(manifest.folder), "source": manifest.data.get("source", ""), "threads": threads,
              "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "requests_per_client": requests,
              "plans": {k: str(v) for k, v in plans.items()}, "sample_text": text, "points": points}
    own.add("serve.json", "serve.md", "serve.png")
    write_json_atomic(Path(out) / "serve.json", result)
    (Path(out) / "serve.md").write_text(markdown(result))
    plot(result, Path(out) / "serve.png")
    return result


def markdown(r: dict) -> str:
    rows = ["| plan | clients | batching | requests | tokens/s | vs no batching | p50 ms | p99 ms | mean layers |",
            "|---|---|---|---|---|---|---|---|---|"]
    points = r["points"]
    for a, b in zip(points[::2], points[1::2]):
        for p in (a, b):
            ratio = f"**{a['tokens_per_s'] / b['tokens_per_s']:.2f}x**" if p is a else "1.00x"
            rows.append(f"| {p['plan']} | {p['clients']} | {'on' if p is a else 'off'} | {p['requests']} | "
                        f"{p['tokens_per_s']:.1f} | {ratio} | {p['p50_ms']:.0f} | {p['p99_ms']:.0f} | "
                        f"{p['mean_layers']:.1f} |")
    return (f"# Serving {r['source']} through tritonserver\n\n{r['prompt_tokens']}-token prompts, {r['new_tokens']} new "
            f"tokens, greedy, one instance per model, closed-loop clients (requests per client: "
            f"{r['requests_per_client']}); outputs of batching on and off identical request for request.\n\n"
            + "\n".join(rows) + f"\n\nSample (text in, text out): {r['sample_text']!r}\n")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (plan, model), style in zip([(p, m) for p in dict.fromkeys(x["plan"] for x in r["points"]) for m in MODELS],
                                    ["-o", "--o", "-s", "--s", "-^", "--^"]):
        pts = [x for x in r["points"] if x["plan"] == plan and x["model"] == model]
        label = f"{plan}, batching {'on' if MODELS[model] else 'off'}"
        axes[0].plot([x["clients"] for x in pts], [x["tokens_per_s"] for x in pts], style, label=label)
        axes[1].plot([x["clients"] for x in pts], [x["p50_ms"] for x in pts], style, label=label)
    for ax, title in zip(axes, ["throughput (generated tokens/s)", "p50 latency per request (ms)"]):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16], ["1", "4", "16"])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{r['source']} through tritonserver, {r['prompt_tokens']}+{r['new_tokens']} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

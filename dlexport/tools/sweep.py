"""``dlexport bench --threads-sweep 1,2,...``: tokens/s per thread count, in one interleaved run.

ONNX Runtime's shared thread pool has one size per process (engines/threads.py), so each thread count gets its own
worker process that loads the runtime once; the parent sends every worker the same prompt each round, one request
at a time in a rotated order, so all counts see the same machine state. Every entry (the full model, each plan) runs
in every worker; ratios are to the first thread count's full model in the same round.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

from ..errors import InputError
from ..runtime import Plan
from .bench import Measured, folder_manifest
from .environment import describe_device, versions
from .stats import median, percentile


def _worker(conn, folder: str, threads: int, plans: dict[str, Plan | None], device: str) -> None:
    """One thread count: load once, then run (entry, prompt, new_tokens) requests until told to stop."""
    from ..runtime import Runtime
    from .bench import stitched_runner

    try:
        runtime = Runtime.load(folder, device=device, threads=threads)
        runners = {name: stitched_runner(runtime, p or Plan.full(runtime.manifest))
                   for name, p in plans.items()}
        conn.send(("ready", None))
    except Exception as e:  # reported to the parent, which raises it with the thread count
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            return
        name, prompt, new_tokens = msg
        conn.send(("done", runners[name](prompt, new_tokens)))


class _Workers:
    def __init__(self, folder: Path, counts: list[int], plans: dict[str, Plan | None], device: str):
        ctx = mp.get_context("spawn")  # a fresh interpreter: no thread pool inherited from this process
        self.pipes, self.procs = {}, []
        for n in counts:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, str(folder), n, plans, device), daemon=True)
            proc.start()
            self.pipes[n] = parent
            self.procs.append(proc)
        for n, pipe in self.pipes.items():
            status, info = pipe.recv()
            if status == "error":
                self.close()
                raise RuntimeError(f"the {n}-thread worker could not load {folder}: {info}")

    def run(self, n: int, name: str, prompt: list[int], new_tokens: int) -> Measured:
        self.pipes[n].send((name, prompt, new_tokens))
        return self.pipes[n].recv()[1]

    def close(self) -> None:
        for pipe in self.pipes.values():
            try:
                pipe.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


def run_sweep(folder: Path | str, counts: list[int], plans: list[Plan], *, prompt_tokens: int = 64,
              new_tokens: int = 64, repeats: int = 5, prompt_count: int = 3, device: str = "cpu", warmup: int = 1,
              command: str = "", log=print) -> dict:
    """Interleave every (thread count, entry) pair for ``repeats`` rounds; return the sweep as a JSON-ready dict."""
    from transformers import AutoTokenizer

    from .prompts import prose_prompts

    if not counts or any(not isinstance(n, int) or n < 1 for n in counts) or len(set(counts)) != len(counts):
        raise InputError(f"--threads-sweep takes distinct thread counts >= 1 (e.g. 1,2,4); got {counts}")
    folder = Path(folder)
    manifest = folder_manifest(folder)
    entries: dict[str, Plan | None] = {"full": None}
    for i, plan in enumerate(plans):
        plan.check_model(manifest)
        name = plan.name or f"plan-{len(plan.layers)}of{manifest.num_layers}"
        entries[name if name not in entries else f"{name}-{i}"] = plan
    tdir = manifest.tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(tdir) if tdir is not None and tdir.exists() else None
    prompts = prose_prompts(prompt_count, prompt_tokens, tokenizer, manifest.arch["vocab_size"])
    pairs = [(n, name) for n in counts for name in entries]
    log(f"threads sweep {counts} x {list(entries)}: {repeats} rounds of {prompt_tokens} + {new_tokens} tokens")
    workers = _Workers(folder, counts, entries, device)
    try:
        for _ in range(warmup):
            for n, name in pairs:
                workers.run(n, name, prompts[0]["ids"], new_tokens)
        records: dict[tuple[int, str], list[Measured]] = {p: [] for p in pairs}
        for r in range(repeats):
            prompt = prompts[r % len(prompts)]["ids"]
            k = r % len(pairs)
            for pair in pairs[k:] + pairs[:k]:
                records[pair].append(workers.run(*pair, prompt, new_tokens))
            log(f"  round {r + 1}/{repeats}: " + ", ".join(
                f"{name}@{n} {records[(n, name)][-1].tokens_per_s:.1f}" for n, name in pairs) + " tokens/s")
    finally:
        workers.close()
    base = records[(counts[0], "full")]
    results = []
    for (n, name), ms in records.items():
        same = [m.tokens == b.tokens for m, b in zip(ms, records[(counts[0], name)])]
        speeds = [m.tokens_per_s for m in ms]
        ratios = [m.tokens_per_s / b.tokens_per_s for m, b in zip(ms, base)]
        own = [m.tokens_per_s / b.tokens_per_s for m, b in zip(ms, records[(counts[0], name)])]
        results.append({"threads": n, "run": name, "layers_per_token": median([m.layers_per_token for m in ms]),
                        "tokens_per_s": {"median": median(speeds), "p90": percentile(speeds, 90)},
                        f"vs_full_at_{counts[0]}": median(ratios), f"vs_itself_at_{counts[0]}": median(own),
                        "same_tokens_as_first_count": all(same), "per_round_tokens_per_s": speeds})
    return {"format": "dlexport-threads-sweep", "version": 1,
            "config": {"command": command, "folder": str(folder), "counts": counts, "runs": list(entries),
                       "model": {"source": manifest.data.get("source"), "num_layers": manifest.num_layers,
                                 "dtype": manifest.dtype},
                       "device": describe_device(device), "versions": versions(), "prompt_tokens": prompt_tokens,
                       "new_tokens": new_tokens, "repeats": repeats, "warmup_rounds": warmup,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "results": results}


def markdown(sweep: dict) -> str:
    c = sweep["config"]
    first = c["counts"][0]
    lines = [f"# dlexport threads sweep: {c['model']['source']} ({c['model']['num_layers']} layers, "
             f"{c['model']['dtype']})", "",
             f"- device: {c['device'].get('name')} ({c['device'].get('kind')}), batch 1, greedy, prompt "
             f"{c['prompt_tokens']} / {c['new_tokens']} new tokens, {c['repeats']} interleaved rounds",
             f"- measured {c['created']}" + (f" with `{c['command']}`" if c.get("command") else ""), "",
             f"Ratios are medians of per-round ratios, against the same run at {first} thread(s) and against the full "
             f"model at {first} thread(s), measured in the same round.", "",
             f"| run | threads | layers/token | tokens/s (median / p90) | vs itself at {first} | vs full at {first} "
             f"| tokens |", "|---|---|---|---|---|---|---|"]
    for r in sweep["results"]:
        lines.append(f"| {r['run']} | {r['threads']} | {r['layers_per_token']:.1f} | "
                     f"{r['tokens_per_s']['median']:.1f} / {r['tokens_per_s']['p90']:.1f} | "
                     f"{r[f'vs_itself_at_{first}']:.2f}x | {r[f'vs_full_at_{first}']:.2f}x | "
                     f"{'same' if r['same_tokens_as_first_count'] else 'DIFFERENT'} |")
    return "\n".join(lines) + "\n"


def plot(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = sweep["config"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in c["runs"]:
        rows = [r for r in sweep["results"] if r["run"] == run]
        ax.plot([r["threads"] for r in rows], [r["tokens_per_s"]["median"] for r in rows], marker="o", label=run)
    ax.set_xlabel("threads")
    ax.set_ylabel("tokens/s (median)")
    ax.set_xticks(c["counts"])
    ax.set_ylim(bottom=0)
    ax.set_title(f"{c['model']['source']}, {c['device'].get('kind')}, prompt {c['prompt_tokens']} / "
                 f"{c['new_tokens']} new")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

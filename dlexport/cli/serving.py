"""serve-repo, serve: a Triton model repository for a dlexport folder, and tritonserver running it."""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("serve-repo", help="write a Triton Inference Server model repository for an export or "
                                          "engine folder")
    p.add_argument("dir", type=Path, help="export folder or engine folder (referenced, not copied)")
    p.add_argument("--out", type=Path, required=True, help="the repository folder (new, or one dlexport wrote)")
    _repo_options(p)
    p.set_defaults(func=_serve_repo)

    p = sub.add_parser("serve", help="start tritonserver on a repository (or on a folder, through a temporary "
                                     "repository) and print its endpoints; Ctrl-C stops it")
    p.add_argument("dir", type=Path, nargs="?", help="a repository from serve-repo, or an export/engine folder")
    p.add_argument("--prepare-env", action="store_true", help="first create the Python environment the bundled "
                   "server's Python backend needs (a venv with numpy<2 and nvidia-pytriton; ~30 s)")
    p.add_argument("--python-env", type=Path, help="that environment's folder (default ~/.cache/dlexport/"
                                                   "triton-pythonX.Y, or $DLEXPORT_TRITON_ENV)")
    p.add_argument("--tritonserver", type=Path, help="use this tritonserver (e.g. an NGC container's) instead of "
                                                     "the bundled one")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the models to load")
    _repo_options(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("serve-bench", help="throughput and p50/p99 latency through tritonserver at 1/4/16 clients, "
                                           "for full depth and plans, dynamic batching on vs off")
    p.add_argument("dir", type=Path, help="export folder or engine folder")
    p.add_argument("--out", type=Path, required=True, help="results folder (serve.json, serve.md, serve.png)")
    p.add_argument("--plan", action="append", default=[], metavar="NAME=FILE", type=_named_plan)
    p.add_argument("--clients", default="1,4,16", help="concurrent client counts")
    p.add_argument("--requests", type=int, help="requests per client (default: 4 at 1 client, else 2)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, help="CPU threads per instance (default: every core)")
    p.set_defaults(func=_serve_bench)


def _repo_options(p) -> None:
    p.add_argument("--name", default="dlexport", help="the model's name on the server")
    p.add_argument("--plan", action="append", default=[], metavar="NAME=FILE", type=_named_plan,
                   help="a plan requests may select by NAME (repeat); 'full' (every layer) is always served")
    p.add_argument("--device", default="cpu", help="cpu or cuda (with KIND_GPU instances: one per GPU given)")
    p.add_argument("--threads", type=int, help="CPU threads per instance (default: every core)")
    p.add_argument("--instances", type=int, default=1, help="model instances (processes) per device")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests merged into one batch at most")
    p.add_argument("--queue-delay-us", type=int, default=2000, help="how long the batcher waits for more requests")
    p.add_argument("--no-batching", action="store_true", help="no dynamic batching: one request per call")
    p.add_argument("--streaming", action="store_true", help="decoupled mode: one response per token (gRPC stream)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="for requests that give none")
    p.add_argument("--lookup", type=int, default=0, metavar="N", help="speculative requests that give no 'lookup' "
                   "draft by prompt lookup of their last N tokens first (0: off)")
    p.add_argument("--no-learning", action="store_true", help="do not keep what speculation learned across "
                   "restarts (a repository's NAME/learning.json)")


def _named_plan(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: give a plan as NAME=FILE, e.g. fast=plan15.json")
    return name, Path(path)


def _settings(args):
    from ..errors import InputError
    from ..serving.repository import RepoSettings

    plans = dict(args.plan)
    if len(plans) != len(args.plan):
        raise InputError("a plan name is given twice in --plan: give each plan its own NAME")
    return RepoSettings(name=args.name, device=args.device, threads=args.threads, instances=args.instances,
                        max_batch_size=args.max_batch_size, queue_delay_us=args.queue_delay_us,
                        batching=not args.no_batching, streaming=args.streaming,
                        max_new_tokens=args.max_new_tokens, plans=plans, lookup=args.lookup,
                        learning=not args.no_learning)


def _serve_repo(args) -> int:
    from ..serving.repository import write_repository

    model = write_repository(args.dir, args.out, _settings(args))
    print(f"wrote {model} (model {args.name!r}); start it with: dlexport serve {args.out}")
    return 0


def _serve(args) -> int:
    from ..errors import InputError
    from ..serving.environment import check_env, prepare_env
    from ..serving.repository import write_repository
    from ..serving.server import Server, check_host

    env = None
    if args.tritonserver is None:
        env = prepare_env(args.python_env, log=lambda m: print(m, file=sys.stderr)) if args.prepare_env \
            else check_env(args.python_env)
    if args.dir is None:
        if not args.prepare_env:
            raise InputError("give a repository or an export/engine folder to serve (or --prepare-env alone)")
        print(f"Triton Python environment ready: {env.root}")
        return 0
    temporary = None
    repo = args.dir
    if (args.dir / "manifest.json").exists() or (args.dir / "engines.json").exists():  # a folder: serve it
        temporary = tempfile.TemporaryDirectory(prefix="dlexport-repo-")
        repo = Path(temporary.name) / "repo"
        write_repository(args.dir, repo, _settings(args))
    server = Server(repo, check_host(args.host), args.http_port, args.grpc_port, args.metrics_port,
                    args.tritonserver, env)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, a container stop: the same clean stop as Ctrl-C
    try:
        print(f"starting tritonserver on {repo} (log: {server.log}) ...", file=sys.stderr)
        server.start(args.timeout)
        print(f"ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}; "
              f"health: http://{server.http_url}/v2/health/ready; Ctrl-C stops it", flush=True)
        while server.process.poll() is None:
            time.sleep(0.5)
        print(f"tritonserver exited with code {server.process.returncode}: {server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping tritonserver ...", file=sys.stderr)
        return 0
    finally:
        server.stop()
        if temporary is not None:
            temporary.cleanup()


def _serve_bench(args) -> int:
    from ..serving.bench import bench

    clients = tuple(int(c) for c in args.clients.split(","))
    requests = {c: args.requests or (4 if c == 1 else 2) for c in clients}
    bench(args.dir, args.out, dict(args.plan), clients=clients, requests=requests, new_tokens=args.new_tokens,
          prompt_tokens=args.prompt_tokens, threads=args.threads, log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {args.out}/serve.md, serve.json, serve.png")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt

"""The stitching runtime: embedding, then only the layers a plan or an exit decision asks for, then the exit head.

The per-token path is ``_step`` -> ``_run_layers`` -> ``_layer``: a few engine calls on buffers that stay on the
device. Early exit policy (exact caches): when a token exits after layer e, the deeper layers have no key/value for
its position yet. Its hidden state is kept as *pending*; the next time a deeper layer runs, it first takes every
pending position in the same call (they join the current token as extra new tokens). Each deeper layer therefore
computes exactly the key/values the full plan would have, only later; early exit changes which token is emitted,
never the cache. With a batch, a token exits only when every row passes the criterion.
"""
from __future__ import annotations

import numbers
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checks
from ..engines import open_engines
from ..engines.base import TORCH_DTYPES, Engine
from ..engines.threads import resolve_threads
from ..files import read_json
from ..errors import InputError, echo
from ..manifest import Manifest
from ..contract import PAST_LENGTH, past_key_name, past_value_name, present_key_name, present_value_name
from .exits import exit_score
from .kv_cache import KVCache
from .plan import Plan, check_adapters, load_plan
from .sampling import Sampling, pick


class PromptTooLongError(InputError):
    pass


@dataclass
class StepStats:
    layers_executed: int  # decoder layers this token ran (pending fills of earlier tokens not counted)
    exit_layer: int | None  # layer after which the token exited, None when it ran the whole plan


@dataclass
class Generation:
    prompt_tokens: list[list[int]]
    tokens: list[list[int]]
    texts: list[str]
    steps: list[StepStats]
    timings_ms: dict[str, float]  # per subgraph, when profiling (synchronised per call)
    prefill_s: float
    total_s: float
    plan: str = ""
    extra: dict = field(default_factory=dict)  # strategy-specific statistics

    @property
    def new_tokens(self) -> int:
        return max((len(t) for t in self.tokens), default=0)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens * len(self.tokens) / self.total_s if self.total_s else 0.0

    @property
    def mean_layers(self) -> float:
        return sum(s.layers_executed for s in self.steps) / len(self.steps) if self.steps else 0.0


@dataclass
class _Segment:
    """Hidden states of consecutive new positions (plus the embed's rotary cos/sin by name), at some depth."""

    hidden: torch.Tensor
    rotary: dict = field(default_factory=dict)
    frontier: int = -1  # index into the plan's layers of the last layer applied

    def prepend(self, older: "_Segment") -> None:
        self.hidden = torch.cat([older.hidden, self.hidden], dim=1)
        self.rotary = {k: torch.cat([older.rotary[k], v], dim=1) for k, v in self.rotary.items()}

    def clone(self, frontier: int | None = None) -> "_Segment":
        return _Segment(self.hidden.clone(), {k: v.clone() for k, v in self.rotary.items()},
                        self.frontier if frontier is None else frontier)

    @staticmethod
    def cat(parts: list["_Segment"]) -> "_Segment":
        """Consecutive segments as one (oldest first)."""
        return _Segment(torch.cat([p.hidden for p in parts], dim=1),
                        {k: torch.cat([p.rotary[k] for p in parts], dim=1) for k in parts[0].rotary})


class Runtime:
    def __init__(self, manifest: Manifest, engines: dict[str, Engine], tokenizer=None):
        self.manifest, self.engines, self.tokenizer = manifest, engines, tokenizer
        a = manifest.arch
        self.num_layers, self.kv_heads, self.head_dim = a["num_layers"], a["num_kv_heads"], a["head_dim"]
        self.max_positions = a["max_positions"]
        self.dtype = TORCH_DTYPES[manifest.dtype]
        self.device = engines["embed"].device
        self.layer_keys = [manifest.layer_key(i) for i in range(self.num_layers)]
        self.inplace = manifest.kv == "inplace"  # layers write their KV buffer themselves (exporter/kv_inplace.py)
        self._kv_names = [(past_key_name(i), past_value_name(i), present_key_name(i), present_value_name(i))
                          for i in range(self.num_layers)]
        self.windows = a.get("layer_windows") or [None] * self.num_layers  # sliding window per layer, None: global
        self.layer_rotary = [[s["name"] for s in manifest.subgraph(k)["inputs"] if s["name"].startswith("rotary_")]
                             for k in self.layer_keys]  # the embed outputs each layer takes
        special = manifest.data.get("special_tokens", {})
        self.eos = list(special.get("eos_token_ids") or [])
        self.pad_id = special.get("pad_token_id")
        if self.pad_id is None:
            self.pad_id = self.eos[0] if self.eos else 0
        self._request = threading.local()  # per thread: whether this request times its calls, and the timings
        self.default_plan: Plan | None = None  # an engine folder built for a plan runs that plan by default
        self.threads: int | None = None  # CPU threads the engines were opened with (engines/threads.py)
        self.kv_capacity: int | None = None  # every request's KV buffer size, where the engines fix it (TensorRT)

    # A request runs on one thread, so its profiling switch and timings live in thread-local state: concurrent
    # requests on one Runtime never see each other's.
    @property
    def profile(self) -> bool:
        return getattr(self._request, "profile", False)

    @profile.setter
    def profile(self, value: bool) -> None:
        self._request.profile = value

    @property
    def _timings(self) -> dict[str, float]:
        if not hasattr(self._request, "timings"):
            self._request.timings = {}
        return self._request.timings

    @_timings.setter
    def _timings(self, value: dict[str, float]) -> None:
        self._request.timings = value

    @classmethod
    def load(cls, path: Path | str, *, backend: str = "onnxruntime", device: str = "cpu",
             threads: int | None = None, layers=None, opt_level: str = "all") -> "Runtime":
        """Load an export folder (ONNX files) or an engine folder built by ``dlexport build``.

        ``layers`` restricts which layer engines are loaded (a plan's layers), to save memory on small devices.
        """
        threads = resolve_threads(threads)
        manifest, engines = open_engines(Path(path), backend=backend, device=device, threads=threads,
                                         layers=layers, opt_level=opt_level)
        tokenizer = None
        tdir = manifest.tokenizer_dir()
        if tdir is not None and tdir.exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tdir)
            tokenizer.padding_side = "left"
        runtime = cls(manifest, engines, tokenizer)
        runtime.threads = threads
        index = Path(path) / "engines.json"
        if index.exists():
            built = read_json(index, "engine folder index")
            if built["backend"] != "onnxruntime" and runtime.inplace:  # TensorRT: the buffers are built static
                runtime.kv_capacity = built["settings"]["limits"]["max_context"]
            if (Path(path) / "plan.json").exists():
                runtime.default_plan = load_plan(Path(path) / "plan.json", manifest)
        return runtime

    # -- public API ---------------------------------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 32, plan: Plan | None = None, *,
                 sampling: Sampling = Sampling(), stop_tokens=None, profile: bool = False, strategy: str = "plain",
                 **options) -> Generation:
        """Generate for one prompt or a batch (str, list of str, or lists of token ids; batches are left-padded).

        ``strategy``: "plain", "speculative" (runtime/speculative.py) or "per-sequence" (runtime/depth.py);
        ``options`` go to the strategy.
        """
        events = list(self.stream(prompts, max_new_tokens, plan, sampling=sampling, stop_tokens=stop_tokens,
                                  profile=profile, strategy=strategy, **options))
        return events[-1].result if events else None

    def stream(self, prompts, max_new_tokens: int = 32, plan: Plan | None = None, *,
               sampling: Sampling = Sampling(), stop_tokens=None, profile: bool = False, strategy: str = "plain",
               **options) -> Iterator["StreamEvent"]:
        """Yield one event per generated token; the last event carries the whole ``Generation``.

        Every argument is checked before any work (and before the first event), each refusal an ``InputError``.
        """
        plan = plan or self.default_plan or Plan.full(self.manifest)
        if not isinstance(plan, Plan):
            raise InputError(f"plan must be a Plan (Plan.skip, load_plan), got {type(plan).__name__}")
        plan.check()
        plan.check_model(self.manifest)
        if plan.exit and plan.exit.adapters:
            check_adapters(plan.exit)
        missing = [i for i in plan.layers if self.layer_keys[i] not in self.engines]
        if missing:
            raise InputError(f"the plan runs layers {missing}, which this runtime did not load; load them with "
                             "Runtime.load(..., layers=None) or build engines for this plan")
        checks.integer(max_new_tokens, "max_new_tokens", 1, self.max_positions,
                       fix="ask for at least one new token, at most the model's context")
        if not isinstance(sampling, Sampling):
            raise InputError(f"sampling must be a Sampling(temperature, top_k, top_p, seed), got "
                             f"{type(sampling).__name__}")
        if not isinstance(profile, bool):
            raise InputError(f"profile must be True or False, got {echo(profile)}")
        vocab = self.manifest.arch["vocab_size"]
        if stop_tokens is not None:
            stop_tokens = _token_ids(stop_tokens, vocab, "stop_tokens")
        body = _strategy(strategy, options)
        ids, valid = self._encode(prompts)
        stops = set(self.eos if stop_tokens is None else stop_tokens)
        return self._events(body, ids, valid, max_new_tokens, plan, sampling, stops, profile, options)

    def _events(self, body, ids, valid, max_new_tokens, plan, sampling, stops, profile, options):
        with torch.inference_mode():
            yield from body(self, ids, valid, max_new_tokens, plan, sampling, stops, profile, **options)

    # -- preparing a request ------------------------------------------------------------------------------------
    def _encode(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts: a str, a list of str, a list of token ids, or a list of such lists (tensors/arrays too)."""
        if hasattr(prompts, "tolist") and not isinstance(prompts, (str, bytes)):
            prompts = prompts.tolist()  # a torch tensor or numpy array of token ids
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and
                                        isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, (list, tuple)):
            raise InputError(f"prompts must be a str, a list of str, or token ids (a list of ints, or a list of "
                             f"such lists), got {type(prompts).__name__} {echo(prompts)}")
        if not prompts:
            raise InputError("no prompt given")
        vocab = self.manifest.arch["vocab_size"]
        if all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise InputError("this export has no tokenizer: pass token ids instead of text")
            for i, p in enumerate(prompts):
                try:
                    p.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise InputError(f"prompt {i} is not valid UTF-8 text (undecodable bytes at character "
                                     f"{e.start}): pass it as UTF-8") from None
            rows = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        elif any(isinstance(p, str) for p in prompts):
            raise InputError("prompts mix text and token ids: give all prompts the same way")
        else:
            rows = [_token_ids(p.tolist() if hasattr(p, "tolist") else p, vocab, f"prompt {i}")
                    for i, p in enumerate(prompts)]
        if any(len(r) == 0 for r in rows):
            raise InputError("a prompt is empty: give at least one token")
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, width - len(r):] = torch.tensor(r, dtype=torch.int64)
            valid[b, width - len(r):] = True
        return ids, valid

    def _check_length(self, prompt_len: int, max_new_tokens: int, extra: int = 0) -> int:
        capacity = prompt_len + max_new_tokens + extra
        if prompt_len > self.max_positions:
            raise PromptTooLongError(
                f"the prompt has {prompt_len} tokens but the model's context is {self.max_positions}: shorten it")
        if capacity > self.max_positions:
            raise PromptTooLongError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {capacity} exceeds the model's "
                f"context of {self.max_positions} positions: shorten the prompt or lower max_new_tokens")
        return capacity

    def new_cache(self, layers, batch: int, capacity: int) -> KVCache:
        """Buffers of ``capacity`` slots, or of the fixed size the engines were built for (TensorRT in-place)."""
        if self.kv_capacity is not None:
            if capacity > self.kv_capacity:
                raise PromptTooLongError(
                    f"this request needs {capacity} KV slots (prompt + new tokens) but these engines were built for "
                    f"{self.kv_capacity}: shorten the request or rebuild with a larger --max-context")
            capacity = self.kv_capacity
        return KVCache(layers, batch, self.kv_heads, capacity, self.head_dim, self.dtype, self.device)

    # -- the hot path ---------------------------------------------------------------------------------------------
    def _call(self, name: str, feeds: dict, out: dict | None = None) -> dict:
        if not self.profile:
            return self.engines[name].run(feeds, out)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        out = self.engines[name].run(feeds, out)
        sync()
        self._timings[name] = self._timings.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
        return out

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> _Segment:
        out = self._call("embed", {"input_ids": ids, "position_ids": positions})
        return _Segment(out["hidden_states"], {k: v for k, v in out.items() if k.startswith("rotary_")})

    def head(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """[batch, 1, hidden] -> [batch, vocab] logits."""
        return self._call("head", {"hidden_states": hidden_last.contiguous()})["logits"][:, -1]

    def exit_head(self, layer: int, hidden_last: torch.Tensor, policy=None) -> torch.Tensor:
        """The head at an exit after ``layer``: through the policy's calibrated adapter there, when it has one."""
        path = policy.adapter_path(layer) if policy is not None else None
        if path is not None:
            out = self._adapter(path).run({"hidden_states": hidden_last.float().contiguous()})
            hidden_last = out["hidden_states_out"].to(self.dtype)
        return self.head(hidden_last)

    def _adapter(self, path: Path) -> Engine:
        """Adapters (fp32 ONNX, hidden -> hidden) open on first use, next to the other engines."""
        key = f"adapter:{path}"
        if key not in self.engines:
            from ..engines.onnxruntime import OrtConfig, OrtEngine
            from ..contract import TensorSpec

            dims = ("batch", "tokens", self.manifest.arch["hidden_size"])
            config = OrtConfig(provider="cuda" if self.device.type == "cuda" else "cpu",
                               device_id=self.device.index or 0, threads=self.threads)
            self.engines[key] = OrtEngine(key, path, [TensorSpec("hidden_states", dims, "float32")],
                                          [TensorSpec("hidden_states_out", dims, "float32")], config)
        return self.engines[key]

    def _layer(self, i: int, seg: _Segment, cache: KVCache) -> None:
        """One layer on ``seg``'s new positions; its key/values land in the cache at the layer's length."""
        tokens, length, window = seg.hidden.shape[1], cache.length[i], self.windows[i]
        past_k, past_v, present_k, present_v = self._kv_names[i]
        key, value = cache.key[i], cache.value[i]
        if self.inplace:  # the buffer is past and present: the layer writes it and attends over the filled part
            feeds = {"hidden_states": seg.hidden, "attention_mask": cache.filled_mask(length, tokens, window),
                     past_k: key, past_v: value, PAST_LENGTH: cache.write_index(length)}
        else:  # the whole buffer as past (unwritten slots masked); the new key/values come back to be copied in
            feeds = {"hidden_states": seg.hidden, "attention_mask": cache.mask(length, tokens, window), past_k: key,
                     past_v: value}
        feeds.update((name, seg.rotary[name]) for name in self.layer_rotary[i])
        if self.inplace:
            out = self._call(self.layer_keys[i], feeds, {present_k: key, present_v: value})
            cache.length[i] = length + tokens
        else:
            out = self._call(self.layer_keys[i], feeds)
            cache.write(i, out[present_k], out[present_v])
        seg.hidden = out["hidden_states_out"]

    def run_layers(self, seg: _Segment, layers, cache: KVCache, pending: list[_Segment] | None = None,
                   exit_policy=None, start: int = 0) -> tuple[torch.Tensor | None, int | None, int]:
        """Run ``layers[start:]`` on ``seg``; return (exit logits or None, exit layer, layers run).

        Pending segments (earlier tokens that exited) join before the first layer they have not been through.
        """
        pending = pending if pending is not None else []
        exits = set(exit_policy.layers) if exit_policy else ()
        for k in range(start, len(layers)):
            while pending and pending[-1].frontier < k:
                seg.prepend(pending.pop())
            self._layer(layers[k], seg, cache)
            seg.frontier = k
            if layers[k] in exits and k + 1 >= exit_policy.min_depth and k + 1 < len(layers):
                logits = self.exit_head(layers[k], seg.hidden[:, -1:], exit_policy)
                score = exit_score(logits, exit_policy, (layers[k] + 1) / self.num_layers)
                if bool((score >= exit_policy.threshold).all()):
                    pending.append(seg.clone(frontier=k))
                    return logits, layers[k], k + 1 - start
        return None, None, len(layers) - start

    def _step(self, ids, positions, layers, cache, pending, exit_policy) -> tuple[torch.Tensor, StepStats]:
        cache.new_step()
        seg = self.embed(ids, positions)
        logits, exit_layer, ran = self.run_layers(seg, layers, cache, pending, exit_policy)
        if logits is None:
            logits = self.head(seg.hidden[:, -1:])
        return logits, StepStats(ran, exit_layer)

    def _generate(self, ids, valid, max_new_tokens, plan, sampling, stops, profile) -> Iterator["StreamEvent"]:
        self.profile, self._timings = profile, {}
        req = Request(self, ids, valid, plan, sampling, stops, max_new_tokens)
        pending: list[_Segment] = []
        t0 = time.perf_counter()
        logits, stats = req.prefill(), StepStats(len(plan.layers), None)  # the prompt runs the whole plan
        prefill_s = time.perf_counter() - t0
        while True:
            yield from req.emit(pick(logits, sampling, req.generator)[:, None], stats)
            if req.finished:
                break
            logits, stats = self._step(req.last_tokens(), req.positions(req.slot), plan.layers, req.cache, pending,
                                       plan.exit)
            req.slot += 1
        total_s = time.perf_counter() - t0
        result = self._result(req.ids, req.valid, req.out[:, :req.n], stops, req.steps, prefill_s, total_s, plan)
        yield StreamEvent(req.n, [], None, result)

    def _result(self, ids, valid, out_tokens, stops, steps, prefill_s, total_s, plan) -> Generation:
        prompt_rows = [r[v].tolist() for r, v in zip(ids.cpu(), valid.cpu())]
        rows = []
        for r in out_tokens.cpu().tolist():
            cut = next((j + 1 for j, t in enumerate(r) if t in stops), len(r))
            rows.append(r[:cut])
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) if self.tokenizer else "" for r in rows]
        return Generation(prompt_rows, rows, texts, steps, dict(self._timings), prefill_s, total_s,
                          plan.name or f"{len(plan.layers)}/{self.num_layers} layers")


@dataclass
class StreamEvent:
    index: int  # 1-based token index; the final event repeats the last index and carries ``result``
    tokens: list[int]  # the new token of each row
    stats: StepStats | None
    result: Generation | None


@dataclass
class Request:
    """The state of one generation request: cache, emitted tokens, stop bookkeeping (every strategy shares it)."""

    runtime: object
    ids: torch.Tensor
    valid: torch.Tensor
    plan: Plan
    sampling: Sampling
    stops: set
    max_new_tokens: int
    steps: list = field(default_factory=list)
    n: int = 0  # tokens emitted

    def __post_init__(self):
        rt, dev = self.runtime, self.runtime.device
        self.ids, self.valid = self.ids.to(dev), self.valid.to(dev)
        self.batch, prompt_len = self.ids.shape
        capacity = rt._check_length(prompt_len, self.max_new_tokens)
        self.cache = rt.new_cache(self.plan.layers, self.batch, capacity)
        self.cache.valid[:, :prompt_len] = self.valid
        self.cache.valid[:, prompt_len:] = True
        self.pad = (~self.valid).sum(1, keepdim=True)
        self.slot = prompt_len  # slot of the last emitted token, which no layer has run yet
        self.generator = self.sampling.generator(dev)
        self.out = torch.zeros(self.batch, self.max_new_tokens, dtype=torch.int64, device=dev)
        self.done = torch.zeros(self.batch, dtype=torch.bool, device=dev)
        self.stop_ids = torch.tensor(sorted(self.stops), dtype=torch.int64, device=dev) if self.stops else None

    def positions(self, slot: int, tokens: int = 1) -> torch.Tensor:
        return (torch.arange(slot, slot + tokens, device=self.runtime.device)[None] - self.pad).clamp_(min=0)

    def prefill(self) -> torch.Tensor:
        """Run the prompt through the plan; return the last position's logits."""
        logits, _ = self.runtime._step(self.ids, self.positions(0, self.ids.shape[1]), self.plan.layers, self.cache,
                                       None, None)
        return logits

    def emit(self, tokens: torch.Tensor, stats: StepStats):
        """Record emitted tokens [B, n] in order; yield one event each; stop at the budget or when every row stopped."""
        for i in range(tokens.shape[1]):
            token = torch.where(self.done, torch.full_like(tokens[:, i], self.runtime.pad_id), tokens[:, i])
            self.out[:, self.n] = token
            self.n += 1
            self.steps.append(stats)
            if self.stop_ids is not None:
                self.done |= torch.isin(token, self.stop_ids)
            yield StreamEvent(self.n, token.tolist(), stats, None)
            if self.finished:
                return

    @property
    def finished(self) -> bool:
        return self.n >= self.max_new_tokens or bool(self.done.all())

    def last_tokens(self) -> torch.Tensor:
        return self.out[:, self.n - 1:self.n]



def _token_ids(row, vocab: int, what: str) -> list[int]:
    """A list of token ids, each an int in [0, vocab): a negative id would wrap around, a large one crash the engine."""
    if isinstance(row, (str, bytes, bytearray)) or not hasattr(row, "__iter__"):
        raise InputError(f"{what} must be a list of token ids, got {type(row).__name__} {echo(row)}")
    out = []
    for j, t in enumerate(row):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise InputError(f"{what}[{j}] is {type(t).__name__} {echo(t)}; token ids are integers")
        if not 0 <= t < vocab:
            raise InputError(f"{what}[{j}] is token id {int(t)}, outside this model's vocabulary 0..{vocab - 1}")
        out.append(int(t))
    return out


def _strategy(name: str, options: dict):
    if not isinstance(name, str):
        raise InputError(f"strategy must be a string, got {echo(name)}")
    if name == "plain":
        if options:
            raise InputError(f"strategy 'plain' takes no options, got {', '.join(options)}")
        return Runtime._generate
    if name == "speculative":
        from .speculative import generate_speculative
        return generate_speculative
    if name == "per-sequence":
        from .depth import generate_per_sequence
        return generate_per_sequence
    raise InputError(f"unknown strategy {echo(name)}; choose plain, speculative or per-sequence")


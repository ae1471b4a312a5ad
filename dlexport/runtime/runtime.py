"""The stitching runtime: loaded engines, and the calls a strategy makes on a request's cache.

A ``Runtime`` holds only what is loaded (engines, tokenizer, the model's numbers), never a request: each request
is a ``DecodeState`` (runtime/state.py) driven by a strategy through the one loop in runtime/decode.py, so requests
may run concurrently on one ``Runtime`` from several threads. The per-token path is ``run_layers`` -> ``layer``: one
engine call per layer, or per layer group (a run of consecutive layers as one session, engines/onnxruntime/group.py),
on buffers that stay on the device.
"""
from __future__ import annotations

import numbers
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import checks
from ..contract import (
    PAST_LENGTH,
    hidden_tap_name,
    past_key_name,
    past_value_name,
    present_key_name,
    present_value_name,
)
from ..engines import open_engines, open_group
from ..engines.base import TORCH_DTYPES, Engine
from ..engines.threads import resolve_threads
from ..errors import InputError, echo
from ..files import read_json
from ..manifest import Manifest
from .decode import EarlyExit, Strategy, decode
from .depth import PerSequence
from .exits import exit_score
from .kv_cache import KVCache
from .plan import Plan, check_adapters, load_plan
from .sampling import Sampling
from .speculative import Speculative
from .state import DecodeState, Generation, Segment, StepStats, StreamEvent

__all__ = ["Generation", "PromptTooLongError", "Runtime", "StepStats", "StreamEvent"]


class PromptTooLongError(InputError):
    pass


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
        self.default_plan: Plan | None = None  # an engine folder built for a plan runs that plan by default
        self.threads: int | None = None  # CPU threads the engines were opened with (engines/threads.py)
        self.kv_capacity: int | None = None  # every request's KV buffer size, where the engines fix it (TensorRT)
        self.grouping = False  # layer groups for each request's plan are opened on its first use (export folders)
        self._groups: dict[int, list[Engine]] = {}  # first layer -> the groups starting there, longest first
        self._grouping_lock = threading.Lock()
        self.speculators: dict = {}  # learning_key -> the last such request's Speculator (what it learned)
        self.learned: dict[str, dict] = {}  # learning_key -> a snapshot from load_learning (used until replaced)
        for e in engines.values():
            if e.layers:
                self._add_group(e)

    @classmethod
    def load(cls, path: Path | str, *, backend: str = "onnxruntime", device: str = "cpu",
             threads: int | None = None, layers=None, opt_level: str = "all", groups: bool = True) -> "Runtime":
        """Load an export folder (ONNX files) or an engine folder built by ``dlexport build``.

        ``layers`` restricts which layer engines are loaded (a plan's layers), to save memory on small devices.
        ``groups``: an export's in-place layers run as layer groups, each run of consecutive loaded layers one
        session, and so do the runs of each plan a request brings (composed on its first use); False runs every
        layer as its own session.
        """
        threads = resolve_threads(threads)
        exported = not (Path(path) / "engines.json").exists()
        manifest, engines = open_engines(Path(path), backend=backend, device=device, threads=threads,
                                         layers=layers, opt_level=opt_level, groups=groups and exported)
        tokenizer = None
        tdir = manifest.tokenizer_dir()
        if tdir is not None and tdir.exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tdir)
            tokenizer.padding_side = "left"
        runtime = cls(manifest, engines, tokenizer)
        runtime.threads = threads
        runtime.grouping = groups and exported and manifest.kv == "inplace"
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
        self.open_groups(plan.layers)
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
        strategy = _strategy(strategy, self, plan, sampling, options)
        ids, valid = self._encode(prompts)
        stops = set(self.eos if stop_tokens is None else stop_tokens)
        state = DecodeState(self, ids, valid, plan, sampling, stops, max_new_tokens, {} if profile else None)
        return self._events(strategy, state)

    @staticmethod
    def _events(strategy: Strategy, state: DecodeState) -> Iterator[StreamEvent]:
        with torch.inference_mode():
            yield from decode(strategy, state)

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

    def open_groups(self, layers) -> None:
        """A group for each run of consecutive ``layers`` that no group covers exactly yet (once per plan; a
        strategy asks for the runs it calls apart, e.g. a draft's prefix). Nothing where grouping is off."""
        if not self.grouping:
            return
        from ..engines.onnxruntime.group import runs

        with self._grouping_lock:
            for run in runs(self.manifest, layers):
                if not any(list(g.layers) == run for g in self._groups.get(run[0], ())):
                    group = open_group(self.manifest, run, self.engines["embed"].config)
                    if group is not None:
                        self.engines[group.name] = group
                        self._add_group(group)

    def _add_group(self, group: Engine) -> None:
        """A new sorted list, swapped in whole: requests on other threads read the old one meanwhile."""
        at = self._groups.get(group.layers[0], [])
        self._groups[group.layers[0]] = sorted(at + [group], key=lambda g: -len(g.layers))

    def save_learning(self, path: Path | str) -> None:
        """Write what speculative requests learned (their draft layers, acceptance evidence and schedules), so that
        a later process starts from it (``load_learning``) instead of from scratch."""
        from .speculative import save_learning

        save_learning(Path(path), self.manifest, {**self.learned, **{k: spec.snapshot() for k, spec in
                                                                      list(self.speculators.items())}})

    def load_learning(self, path: Path | str) -> int:
        """Start speculative requests from a ``save_learning`` file of this model; returns its entries."""
        from .speculative import load_learning

        self.learned.update(load_learning(Path(path), self.manifest))
        return len(self.learned)

    def check_length(self, prompt_len: int, max_new_tokens: int) -> int:
        """The KV slots a request needs, refused with the way out when the model's context is too short."""
        capacity = prompt_len + max_new_tokens
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
    def call(self, name: str, feeds: dict, out: dict | None = None, timings: dict | None = None) -> dict:
        """One engine call; with ``timings`` (a profiling request's own dict) its synchronised wall time is added."""
        if timings is None:
            return self.engines[name].run(feeds, out)
        t0 = time.perf_counter()
        result = self.engines[name].run(feeds, out)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings[name] = timings.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
        return result

    def embed(self, ids: torch.Tensor, positions: torch.Tensor, timings: dict | None = None) -> Segment:
        out = self.call("embed", {"input_ids": ids, "position_ids": positions}, timings=timings)
        return Segment(out["hidden_states"], {k: v for k, v in out.items() if k.startswith("rotary_")})

    def logits(self, hidden: torch.Tensor, timings: dict | None = None) -> torch.Tensor:
        """[batch, tokens, hidden] -> [batch, tokens, vocab]."""
        return self.call("head", {"hidden_states": hidden.contiguous()}, timings=timings)["logits"]

    def head(self, hidden_last: torch.Tensor, timings: dict | None = None) -> torch.Tensor:
        """[batch, 1, hidden] -> [batch, vocab] logits."""
        return self.logits(hidden_last, timings)[:, -1]

    def exit_head(self, layer: int, hidden_last: torch.Tensor, policy=None, timings: dict | None = None) -> torch.Tensor:
        """[batch, 1, hidden] -> [batch, vocab]: the head at an exit after ``layer`` (``exit_logits``)."""
        return self.exit_logits(layer, hidden_last, policy, timings)[:, -1]

    def exit_logits(self, layer: int, hidden: torch.Tensor, policy=None, timings: dict | None = None) -> torch.Tensor:
        """[batch, tokens, vocab]: the head after ``layer``, through the policy's calibrated adapter there, if any."""
        path = policy.adapter_path(layer) if policy is not None else None
        if path is not None:
            out = self._adapter(path).run({"hidden_states": hidden.float().contiguous()})
            hidden = out["hidden_states_out"].to(self.dtype)
        return self.logits(hidden, timings)

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

    def layer(self, i: int, seg: Segment, cache: KVCache, timings: dict | None = None) -> None:
        """One layer on ``seg``'s new positions; its key/values land in the cache at the layer's length."""
        tokens, length, window = seg.hidden.shape[1], cache.length[i], self.windows[i]
        past_k, past_v, present_k, present_v = self._kv_names[i]
        key, value = cache.key[i], cache.value[i]
        feeds = {"hidden_states": seg.hidden, past_k: key, past_v: value}
        feeds.update((name, seg.rotary[name]) for name in self.layer_rotary[i])
        if self.inplace:  # the buffer is past and present: the layer writes it and attends over the filled part
            feeds["attention_mask"] = cache.filled_mask(length, tokens, window)
            feeds[PAST_LENGTH] = cache.write_index(i)
            out = self.call(self.layer_keys[i], feeds, {present_k: key, present_v: value}, timings)
            cache.length[i] = length + tokens
        else:  # the whole buffer as past (unwritten slots masked); the new key/values come back to be copied in
            feeds["attention_mask"] = cache.mask(length, tokens, window)
            out = self.call(self.layer_keys[i], feeds, timings=timings)
            cache.write(i, out[present_k], out[present_v])
        seg.hidden = out["hidden_states_out"]

    def run_layers(self, seg: Segment, layers, cache: KVCache, *, pending: list[Segment] | None = None,
                   exit_policy=None, start: int = 0, timings: dict | None = None, taps: dict | None = None
                   ) -> tuple[torch.Tensor | None, int | None, int]:
        """Run ``layers[start:]`` on ``seg``; return (exit logits or None, exit layer, layers run).

        Pending segments (earlier tokens that exited) join before the first layer they have not been through.
        ``taps``: depths d (start < d < len(layers)) whose hidden states, after ``layers[:d]``, are put in it on the
        way (read from a group's tap outputs; each valid until its engine's next call).
        """
        pending = pending if pending is not None else []
        exits = set(exit_policy.layers) if exit_policy else set()
        k = start
        while k < len(layers):
            while pending and pending[-1].frontier < k:
                seg.prepend(pending.pop())
            group = self._group_at(layers, k, cache, pending, exits)
            if group is None:
                last = k
                self.layer(layers[k], seg, cache, timings)
            else:
                last = k + len(group.layers) - 1
                out = self.group(group, seg, cache, timings)
                if taps:
                    taps.update((d, out[hidden_tap_name(d - k)]) for d in taps if k < d <= last)
            if taps and last + 1 in taps:
                taps[last + 1] = seg.hidden
            seg.frontier = last
            if layers[last] in exits and last + 1 >= exit_policy.min_depth and last + 1 < len(layers):
                logits = self.exit_head(layers[last], seg.hidden[:, -1:], exit_policy, timings)
                score = exit_score(logits, exit_policy, (layers[last] + 1) / self.num_layers)
                if bool((score >= exit_policy.threshold).all()):
                    pending.append(seg.clone(frontier=last))
                    return logits, layers[last], last + 1 - start
            k = last + 1
        return None, None, len(layers) - start

    def _group_at(self, layers, k: int, cache: KVCache, pending: list, exits) -> Engine | None:
        """The longest group that runs ``layers[k:]``'s next layers as they would run one by one: the same filled
        length in each, no exit check and no pending segment joining before its last layer."""
        for group in self._groups.get(layers[k], ()):
            last = k + len(group.layers) - 1
            if (tuple(layers[k:last + 1]) == group.layers and not exits.intersection(group.layers[:-1])
                    and not (pending and pending[-1].frontier < last)
                    and all(cache.length[i] == cache.length[layers[k]] for i in group.layers)):
                return group
        return None

    def group(self, group: Engine, seg: Segment, cache: KVCache, timings: dict | None = None) -> dict:
        """A layer group on ``seg``'s new positions: every layer's KV buffer bound as its past and present.
        Returns its outputs (the taps between its layers among them)."""
        first = group.layers[0]
        tokens, length = seg.hidden.shape[1], cache.length[first]
        feeds = {"hidden_states": seg.hidden, "attention_mask": cache.filled_mask(length, tokens, self.windows[first]),
                 PAST_LENGTH: cache.write_index(first)}
        feeds.update((name, seg.rotary[name]) for name in self.layer_rotary[first])
        out = {}
        for i in group.layers:
            past_k, past_v, present_k, present_v = self._kv_names[i]
            feeds[past_k], feeds[past_v] = out[present_k], out[present_v] = cache.key[i], cache.value[i]
        out = self.call(group.name, feeds, out, timings)
        seg.hidden = out["hidden_states_out"]
        for i in group.layers:
            cache.length[i] = length + tokens
        return out


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


def _strategy(name: str, runtime: Runtime, plan: Plan, sampling: Sampling, options: dict) -> Strategy:
    """A fresh strategy object for one request (it keeps that request's strategy statistics)."""
    if not isinstance(name, str):
        raise InputError(f"strategy must be a string, got {echo(name)}")
    if name == "plain":
        if options:
            raise InputError(f"strategy 'plain' takes no options, got {', '.join(options)}")
        return EarlyExit() if plan.exit else Strategy()
    if name not in _OPTIONS:
        raise InputError(f"unknown strategy {echo(name)}; choose plain, speculative or per-sequence")
    unknown = sorted(set(options) - _OPTIONS[name])
    if unknown:
        raise InputError(f"strategy {name!r} takes the options {', '.join(sorted(_OPTIONS[name]))}; got "
                         f"{', '.join(unknown)}")
    if name == "speculative":
        return Speculative(runtime, plan, **options)
    return PerSequence(runtime, plan, sampling, **options)


_OPTIONS = {"speculative": {"draft", "search", "memory", "lookup"}, "per-sequence": {"controller", "rung", "threshold"}}

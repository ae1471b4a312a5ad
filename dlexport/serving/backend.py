"""The Triton Python-backend model: one ``Runtime`` per instance; requests in, ``Runtime.generate``/``stream`` out.

Imported only inside Triton's backend stub (``triton_python_backend_utils`` exists there). Triton's dynamic batcher
hands ``execute`` every request that queued together; the ones that would give the same tokens in a batch as alone
are merged into one left-padded batch (the runtime's batch path is exact): greedy requests with the same plan and
strategy (plain or speculative) and no early exit. Early exit and per-sequence depth decide for the whole batch,
and a seeded sample draws from one generator per batch, so those requests run alone. A batch that the runtime
refuses (one bad request among good ones) is re-run request by request, so each gets its own answer or error.
What speculative requests learn carries to the next request in the instance (``Runtime.speculators``) and, with
the repository's learning file, across restarts: read when the instance starts, written when it stops.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..errors import DlexportError, InputError, echo
from ..runtime import Plan, Runtime, Sampling, load_plan
from .repository import read_serving

STRATEGIES = ("plain", "speculative", "per-sequence")
BATCHABLE = ("plain", "speculative")


@dataclass
class Job:
    prompt: object  # str or list of token ids
    max_new_tokens: int
    sampling: Sampling
    strategy: str
    plan_name: str
    plan: Plan | None
    lookup: int = 0

    def options(self) -> dict:
        return {"lookup": self.lookup} if self.strategy == "speculative" else {}

    def key(self):
        """Jobs with equal keys give the same tokens batched as alone; None: run alone."""
        exits = self.plan is not None and self.plan.exit is not None and self.strategy == "plain"
        if not self.sampling.greedy or self.strategy not in BATCHABLE or exits:
            return None
        return self.plan_name, self.strategy, isinstance(self.prompt, str), self.lookup


@dataclass
class Result:
    tokens: list[int]
    text: str
    layers: int


class TritonPythonModel:
    def initialize(self, args):
        model_dir = Path(args["model_repository"])
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        s = read_serving(model_dir)
        device = s["device"]
        if args.get("model_instance_kind") == "GPU" and device.startswith("cuda"):
            device = f"cuda:{args['model_instance_device_id']}"  # one instance per GPU of the instance group
        self.runtime = Runtime.load(s["folder"], device=device, threads=s["threads"])
        manifest = self.runtime.manifest
        self.plans = {"full": Plan.full(manifest)}
        self.plans.update((name, load_plan(model_dir / rel, manifest)) for name, rel in s["plans"].items())
        self.default_max_new_tokens = s["max_new_tokens"]
        self.default_lookup = s.get("lookup", 0)
        self.learning = model_dir / s["learning"] if s.get("learning") else None
        if self.learning is not None and self.learning.exists():
            try:
                self.runtime.load_learning(self.learning)
            except DlexportError as e:  # serve from scratch, and leave the file as it is for a look
                pb_utils.Logger.log_warn(f"{self.name}: not starting from {self.learning} ({e}); it is kept and "
                                         "not written over")
                self.learning = None
        self.stops = set(self.runtime.eos)
        counter = pb_utils.MetricFamily.COUNTER
        self.families = {
            "requests": pb_utils.MetricFamily(name="dlexport_requests_total", kind=counter,
                                              description="generation requests answered"),
            "tokens": pb_utils.MetricFamily(name="dlexport_generated_tokens_total", kind=counter,
                                            description="tokens generated"),
            "layers": pb_utils.MetricFamily(
                name="dlexport_layers_executed_total", kind=counter,
                description="decoder layers executed for generated tokens (divide by tokens: mean depth)"),
            "batches": pb_utils.MetricFamily(name="dlexport_batches_total", kind=counter,
                                             description="runtime calls (a merged batch counts once)"),
            "rows": pb_utils.MetricFamily(name="dlexport_batch_rows_total", kind=counter,
                                          description="requests over all runtime calls (divide by batches: "
                                                      "mean batch size)"),
        }
        self.metrics = {}

    def finalize(self):
        """Triton unloads the model (a server stopping): keep what speculation learned for the next start."""
        if self.learning is not None and self.runtime.speculators:
            try:
                self.runtime.save_learning(self.learning)
            except DlexportError as e:
                pb_utils.Logger.log_warn(f"{self.name}: what speculation learned was not saved: {e}")

    # -- metrics --------------------------------------------------------------------------------------------------
    def _count(self, family: str, value: float, job: Job) -> None:
        labels = {"model": self.name, "plan": job.plan_name or "default", "strategy": job.strategy}
        key = (family,) + tuple(labels.values())
        if key not in self.metrics:
            self.metrics[key] = self.families[family].Metric(labels=labels)
        self.metrics[key].increment(value)

    # -- requests -------------------------------------------------------------------------------------------------
    def _parse(self, request) -> Job:
        def get(name):
            t = pb_utils.get_input_tensor_by_name(request, name)
            return None if t is None else t.as_numpy()

        def scalar(name, default, kind):
            a = get(name)
            if a is None:
                return default
            if a.size != 1:
                raise InputError(f"input {name!r} must hold one value per request, got shape {list(a.shape)}")
            v = a.reshape(-1)[0]
            return _text(v, name) if kind is str else kind(v)

        text, ids = get("text"), get("input_ids")
        if (text is None) == (ids is None):
            raise InputError("give the prompt as exactly one of 'text' (BYTES, UTF-8) or 'input_ids' (INT64)")
        given = text if text is not None else ids
        if given.ndim < 1 or given.shape[0] != 1:
            raise InputError(f"send one prompt per request (got a batch of {given.shape[0] if given.ndim else 0}); "
                             "send concurrent requests instead: the server batches them")
        if text is not None:
            if text.size != 1:
                raise InputError(f"'text' must hold one prompt, got shape {list(text.shape)}")
            prompt = _text(text.reshape(-1)[0], "text")
        else:
            prompt = [int(t) for t in ids.reshape(-1)]
        strategy = scalar("strategy", "plain", str) or "plain"
        if strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {echo(strategy)}; choose {', '.join(STRATEGIES)}")
        plan_name = scalar("plan", "", str)
        if plan_name and plan_name not in self.plans:
            raise InputError(f"unknown plan {echo(plan_name)}; this server has {', '.join(sorted(self.plans))} "
                             "(or none: the folder's default); add plans with `dlexport serve-repo --plan NAME=FILE`")
        sampling = Sampling(scalar("temperature", 0.0, float), scalar("top_k", 0, int), scalar("top_p", 1.0, float),
                            scalar("seed", None, int))
        lookup = scalar("lookup", None, int)
        if lookup and strategy != "speculative":
            raise InputError(f"lookup {lookup} drafts by prompt lookup, which only strategy 'speculative' does: send "
                             "strategy 'speculative' with it, or no lookup")
        lookup = (self.default_lookup if lookup is None else lookup) if strategy == "speculative" else 0
        return Job(prompt, scalar("max_new_tokens", self.default_max_new_tokens, int), sampling, strategy,
                   plan_name, self.plans.get(plan_name), lookup)

    def execute(self, requests):
        jobs, answers = {}, {}
        for i, request in enumerate(requests):
            try:
                jobs[i] = self._parse(request)
            except (DlexportError, ValueError) as e:
                answers[i] = e
        groups: dict = {}
        for i, job in jobs.items():
            groups.setdefault(job.key() or ("alone", i), []).append(i)
        senders = {i: r.get_response_sender() for i, r in enumerate(requests)} if self.decoupled else None
        for members in groups.values():
            if self.decoupled:
                self._stream(members, jobs, senders, answers)
            else:
                answers.update(zip(members, self._generate([jobs[i] for i in members])))
        if self.decoupled:
            for i, e in answers.items():
                senders[i].send(_error(e), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return None
        return [_error(answers[i]) if isinstance(answers[i], Exception) else self._response(answers[i])
                for i in range(len(requests))]

    def _generate(self, jobs: list[Job]) -> list:
        """One runtime call for the group; each job's Result, or its error."""
        first = jobs[0]
        n = max(j.max_new_tokens for j in jobs)
        try:
            g = self.runtime.generate([j.prompt for j in jobs], n, first.plan, sampling=first.sampling,
                                      strategy=first.strategy, **first.options())
        except (DlexportError, ValueError) as e:
            if len(jobs) == 1:
                return [e]
            return [self._generate([j])[0] for j in jobs]
        except Exception as e:  # noqa: BLE001 - a bug answers its requests; the instance keeps serving
            return [RuntimeError(f"internal error in dlexport ({type(e).__name__}: {e}): please report it")] * len(jobs)
        self._count("batches", 1, first)
        out = []
        for j, tokens, text in zip(jobs, g.tokens, g.texts):
            kept = tokens[:j.max_new_tokens]
            if len(kept) < len(tokens):  # merged with a longer request: its text is re-decoded from its own tokens
                text = self.runtime.tokenizer.decode(kept, skip_special_tokens=True) if self.runtime.tokenizer else ""
            out.append(Result(kept, text, sum(s.layers_executed for s in g.steps[:len(kept)])))
            self._record(j, out[-1])
        return out

    def _record(self, job: Job, r: Result) -> None:
        self._count("requests", 1, job)
        self._count("rows", 1, job)
        self._count("tokens", len(r.tokens), job)
        self._count("layers", r.layers, job)

    def _response(self, r: Result):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([[r.text.encode()]], dtype=np.object_)),
            pb_utils.Tensor("output_ids", np.array([r.tokens], dtype=np.int64)),
            pb_utils.Tensor("layers_executed", np.array([[r.layers]], dtype=np.int64)),
            pb_utils.Tensor("mean_layers", np.array([[r.layers / max(1, len(r.tokens))]], dtype=np.float32))])

    def _stream(self, members: list[int], jobs: dict, senders: dict, answers: dict) -> None:
        """Decoupled mode: one response per token per request (its text delta, the token, that token's layers),
        then a final flag. A cancelled request (the client went away) stops getting tokens; when every request of
        the group is gone, the generation stops."""
        group = [jobs[i] for i in members]
        first = group[0]
        n = max(j.max_new_tokens for j in group)
        try:
            events = self.runtime.stream([j.prompt for j in group], n, first.plan, sampling=first.sampling,
                                         strategy=first.strategy, **first.options())
            event = next(events)
        except (DlexportError, ValueError) as e:
            if len(group) == 1:
                answers[members[0]] = e
                return
            for i in members:
                self._stream([i], jobs, senders, answers)
            return
        self._count("batches", 1, first)
        rows = [Result([], "", 0) for _ in group]
        live = list(range(len(group)))
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            while event.result is None and live:
                for r in list(live):
                    sender, job, row = senders[members[r]], group[r], rows[r]
                    if sender.is_cancelled():
                        live.remove(r)
                        sender.send(flags=final)
                        continue
                    token = event.tokens[r]
                    row.tokens.append(token)
                    row.layers += event.stats.layers_executed
                    text = self.runtime.tokenizer.decode(row.tokens, skip_special_tokens=True) \
                        if self.runtime.tokenizer else ""
                    delta, row.text = text[len(row.text):], text
                    sender.send(self._response(Result([token], delta, event.stats.layers_executed)))
                    if token in self.stops or len(row.tokens) >= job.max_new_tokens:
                        live.remove(r)
                        sender.send(flags=final)
                        self._record(job, row)
                event = next(events)
        finally:
            events.close()
            for r in live:
                senders[members[r]].send(flags=final)


def _text(value, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"input {name!r} is not UTF-8 (bad byte at {e.start}): send UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise InputError(f"input {name!r} must be BYTES (UTF-8 text), got {type(value).__name__}")


def _error(e: Exception):
    code = pb_utils.TritonError.INVALID_ARG if isinstance(e, (DlexportError, ValueError)) and \
        hasattr(pb_utils.TritonError, "INVALID_ARG") else None
    err = pb_utils.TritonError(str(e)) if code is None else pb_utils.TritonError(str(e), code)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)

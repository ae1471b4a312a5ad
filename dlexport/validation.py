"""Check an export against the PyTorch modules it came from, subgraph by subgraph, then stitched end to end.

Per subgraph, three cases run in ONNX Runtime (CPU) and in PyTorch: a prefill (7 tokens, no past), a decode step
(1 token after 7 past) and a batch of two left-padded prompts. The tolerance is relative to the output's magnitude:
max|onnx - torch| <= tol * max(1, max|torch|), with tol 1e-4 for fp32 and 2e-2 for fp16/bf16. End to end, the
stitched runtime's greedy tokens must equal Hugging Face ``generate(do_sample=False)`` token for token.

It sits above the exporter, the engines and the runtime, which it checks against each other (``pipeline.export``
runs it after exporting).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .contract import PAST_LENGTH
from .engines.onnxruntime import OrtConfig
from .engines.onnxruntime.loader import create_session
from .errors import DlexportError
from .exporter.architectures import (architecture_for, past_key_name, past_value_name, present_key_name,
                                     present_value_name, sequence_mask)
from .exporter.onnx_export import subgraphs
from .exporter.sources import LoadedModel
from .manifest import Manifest
from .runtime import Runtime

TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
END_TO_END_TOKENS = 32


class ValidationError(DlexportError, AssertionError):
    pass


@dataclass
class Check:
    subgraph: str
    case: str
    max_abs_diff: float
    max_abs_ref: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    tokens_runtime: list[int] = field(default_factory=list)
    tokens_reference: list[int] = field(default_factory=list)
    end_to_end: str = "not run"

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and self.end_to_end in ("match", "not run")

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "subgraphs": [{"subgraph": c.subgraph, "case": c.case, "max_abs_diff": c.max_abs_diff,
                           "max_abs_ref": c.max_abs_ref, "tolerance": c.tolerance, "ok": c.ok} for c in self.checks],
            "end_to_end": {"result": self.end_to_end, "runtime": self.tokens_runtime,
                           "reference": self.tokens_reference},
        }

    def raise_if_failed(self) -> None:
        if self.ok:
            return
        bad = [f"{c.subgraph}/{c.case}: {c.max_abs_diff:.3g} > {c.tolerance:.3g}" for c in self.checks if not c.ok]
        if self.end_to_end not in ("match", "not run"):
            bad.append(f"end to end: {self.end_to_end}")
        raise ValidationError("export does not match PyTorch: " + "; ".join(bad))


def _cases(arch, sub, dtype):
    """(name, inputs) for prefill, decode and a left-padded batch of two.

    A layer gets the mask of its kind (with its sliding window, which 7 tokens exceed in the tiny configs) and the
    rotary pair the embed computes for those positions.
    """
    n = arch.numbers
    gen = torch.Generator().manual_seed(1)
    window = n.layer_windows[int(sub.name.split("_")[1])] if sub.name.startswith("layer_") else None
    embed = arch.embed_module() if any(s.name.startswith("rotary_") for s in sub.inputs) else None

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    cases = []
    for case, batch, tokens, past, pad in (("prefill", 1, 7, 0, [0]), ("decode", 1, 1, 7, [0]),
                                           ("batch2_left_padded", 2, 6, 0, [3, 0])):
        positions = torch.stack([(torch.arange(past, past + tokens) - p).clamp(min=0) for p in pad])
        valid = torch.stack([torch.arange(past + tokens) >= p for p in pad])
        rotary = {}
        if embed is not None:
            with torch.no_grad():
                rotary = arch.split_embed(embed(torch.zeros_like(positions), positions))[1]
        values = {}
        for spec in sub.inputs:
            if spec.name == "input_ids":
                values[spec.name] = torch.randint(0, n.vocab_size, (batch, tokens), generator=gen)
            elif spec.name == "position_ids":
                values[spec.name] = positions
            elif spec.name == "attention_mask":
                values[spec.name] = sequence_mask(valid, tokens, window, dtype)
            elif spec.name in rotary:
                values[spec.name] = rotary[spec.name]
            elif spec.name.startswith("past_key_values"):
                values[spec.name] = rand(batch, n.num_kv_heads, past, n.head_dim)
            else:
                values[spec.name] = rand(batch, tokens, n.hidden_size)
        cases.append((case, values))
    return cases


def check_subgraphs(manifest: Manifest, loaded: LoadedModel, log=print, names=None) -> list[Check]:
    """Each subgraph in ONNX Runtime against its PyTorch module; one session at a time keeps memory low."""

    arch = architecture_for(loaded.model)
    dtype = next(loaded.model.parameters()).dtype
    tol = TOLERANCE[manifest.dtype]
    checks = []
    for sub in subgraphs(arch):
        if names is not None and sub.name not in names:
            continue
        session = create_session(manifest.path(sub.name), OrtConfig(opt_level="all"))
        inplace = manifest.kv == "inplace" and sub.name.startswith("layer_")
        for case, values in _cases(arch, sub, dtype):
            with torch.no_grad():
                ref = sub.module(*values.values())
            ref = ref if isinstance(ref, tuple) else (ref,)
            if inplace:
                got = _run_inplace(session, sub, values, int(sub.name.split("_")[1]), gen=torch.Generator().manual_seed(3))
            else:
                got = [torch.from_numpy(g) for g in
                       session.run([o.name for o in sub.outputs], {k: v.numpy() for k, v in values.items()})]
            diff = max(float((g.float() - r.float()).abs().max()) for g, r in zip(got, ref))
            mag = max(float(r.float().abs().max()) for r in ref)
            checks.append(Check(sub.name, case, diff, mag, tol * max(1.0, mag)))
        del session
    worst = {}
    for c in checks:
        worst[c.subgraph] = max(worst.get(c.subgraph, c), c, key=lambda x: x.max_abs_diff / x.tolerance)
    for c in worst.values():
        log(f"  {c.subgraph:10s} max |onnx - torch| {c.max_abs_diff:.2e} (worst case {c.case}, tolerance "
            f"{c.tolerance:.1e}) {'ok' if c.ok else 'FAIL'}")
    return checks


def _run_inplace(session, sub, values: dict, index: int, gen) -> list[torch.Tensor]:
    """Run an in-place layer on the portable case ``values``: the past goes into a larger buffer whose other slots hold
    noise; return (hidden, the new key/values read back from the buffer). Slots the layer must not write are
    checked unchanged here, so a stray write fails validation."""
    past_k, past_v = values[past_key_name(index)], values[past_value_name(index)]
    b, h, past, d = past_k.shape
    tokens = values["hidden_states"].shape[1]
    capacity = past + tokens + 3
    buffers = []
    for p in (past_k, past_v):
        buf = torch.randn(b, h, capacity, d, generator=gen).to(p.dtype)
        buf[:, :, :past] = p
        buffers.append(buf)
    before = [x.clone() for x in buffers]
    feeds = {k: v for k, v in values.items() if not k.startswith("past_key_values")}
    feeds.update({past_key_name(index): buffers[0], past_value_name(index): buffers[1],
                  PAST_LENGTH: torch.full((b,), past, dtype=torch.int64)})
    binding = session.io_binding()
    for name, t in feeds.items():
        binding.bind_cpu_input(name, t.contiguous().numpy())
    binding.bind_output(sub.outputs[0].name, "cpu")
    for name, buf in ((present_key_name(index), buffers[0]), (present_value_name(index), buffers[1])):
        binding.bind_output(name, "cpu", 0, buf.numpy().dtype, tuple(buf.shape), buf.data_ptr())
    session.run_with_iobinding(binding)
    hidden = torch.from_numpy(binding.copy_outputs_to_cpu()[0])
    for buf, old in zip(buffers, before):
        outside = torch.cat([buf[:, :, :past] - old[:, :, :past], buf[:, :, past + tokens:] - old[:, :, past + tokens:]], 2)
        if outside.numel() and float(outside.abs().max()) != 0.0:
            raise ValidationError(f"{sub.name} wrote its KV buffer outside the new tokens' slots")
    return [hidden, buffers[0][:, :, past:past + tokens], buffers[1][:, :, past:past + tokens]]


def reference_prompt(manifest: Manifest, loaded: LoadedModel) -> list[int]:
    """A fixed real-text prompt where there is a tokenizer, fixed random ids otherwise."""
    if loaded.tokenizer is not None:
        return loaded.tokenizer("The key/value cache of a transformer stores", add_special_tokens=True)["input_ids"]
    gen = torch.Generator().manual_seed(2)
    return torch.randint(3, manifest.arch["vocab_size"], (12,), generator=gen).tolist()


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Hugging Face ``generate`` greedily, never stopping early (so both sides produce ``new_tokens``)."""
    model.generation_config.eos_token_id = None  # a GenerationConfig argument does not override this one
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_end_to_end(manifest: Manifest, loaded: LoadedModel, report: Report, log=print) -> None:

    prompt = reference_prompt(manifest, loaded)
    runtime = Runtime.load(manifest.folder)
    report.tokens_runtime = runtime.generate([prompt], END_TO_END_TOKENS, stop_tokens=[]).tokens[0]
    report.tokens_reference = hf_greedy(loaded.model, prompt, END_TO_END_TOKENS)
    same = report.tokens_runtime == report.tokens_reference
    first_diff = next((i for i, (a, b) in enumerate(zip(report.tokens_runtime, report.tokens_reference)) if a != b), None)
    report.end_to_end = "match" if same else f"tokens differ from position {first_diff}"
    log(f"  stitched greedy vs HF generate, {END_TO_END_TOKENS} tokens: "
        f"{'identical' if same else report.end_to_end.upper()}")


def validate(manifest: Manifest, loaded: LoadedModel, log=print, end_to_end: bool = True) -> Report:
    log(f"validating {manifest.folder} ({manifest.dtype}) against PyTorch")
    t0 = time.perf_counter()
    report = Report(check_subgraphs(manifest, loaded, log))
    t1 = time.perf_counter()
    if end_to_end:
        if manifest.dtype == "float32":
            check_end_to_end(manifest, loaded, report, log)
        else:
            log("  end-to-end token check skipped: it needs fp32 (fp16 rounding makes greedy ties diverge legitimately)")
            report.end_to_end = "not run"
    t2 = time.perf_counter()
    log(f"validation took {t2 - t0:.1f} s (subgraphs {t1 - t0:.1f} s, end to end {t2 - t1:.1f} s)")
    return report

"""Check an export against the PyTorch modules it came from, subgraph by subgraph, then stitched end to end.

Per subgraph, three cases run in ONNX Runtime (CPU) and in PyTorch: a prefill (7 tokens, no past), a decode step
(1 token after 7 past) and a batch of two left-padded prompts. The tolerance is relative to the output's magnitude:
max|onnx - torch| <= tol * max(1, max|torch|), with tol 1e-4 for fp32 and 2e-2 for fp16/bf16. End to end, the
stitched runtime's greedy tokens must equal Hugging Face ``generate(do_sample=False)`` token for token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import DlexportError
from ..manifest import Manifest
from .architectures import architecture_for
from .onnx_export import subgraphs
from .sources import LoadedModel

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
    """(name, inputs) for prefill, decode and a left-padded batch of two."""
    n = arch.numbers
    gen = torch.Generator().manual_seed(1)
    min_val = torch.finfo(dtype).min

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    def mask(batch, tokens, past, pad):
        allowed = torch.ones(batch, tokens, past + tokens, dtype=torch.bool).tril(past)
        for b, p in enumerate(pad):
            allowed[b, :, :p] = False
        allowed[:, :, past:] |= torch.eye(tokens, dtype=torch.bool)
        return torch.zeros(batch, 1, tokens, past + tokens, dtype=dtype).masked_fill(~allowed[:, None], min_val)

    cases = []
    for case, batch, tokens, past, pad in (("prefill", 1, 7, 0, [0]), ("decode", 1, 1, 7, [0]),
                                           ("batch2_left_padded", 2, 6, 0, [3, 0])):
        positions = torch.stack([(torch.arange(past, past + tokens) - p).clamp(min=0) for p in pad])
        values = {}
        for spec in sub.inputs:
            if spec.name == "input_ids":
                values[spec.name] = torch.randint(0, n.vocab_size, (batch, tokens), generator=gen)
            elif spec.name == "position_ids":
                values[spec.name] = positions
            elif spec.name == "attention_mask":
                values[spec.name] = mask(batch, tokens, past, pad)
            elif spec.name in ("rotary_cos", "rotary_sin"):
                cos, sin = arch.model.model.rotary_emb(rand(1, tokens, n.hidden_size), positions)
                values[spec.name] = cos if spec.name == "rotary_cos" else sin
            elif spec.name.startswith("past_key_values"):
                values[spec.name] = rand(batch, n.num_kv_heads, past, n.head_dim)
            else:
                values[spec.name] = rand(batch, tokens, n.hidden_size)
        cases.append((case, values))
    return cases


def check_subgraphs(manifest: Manifest, loaded: LoadedModel, log=print, names=None) -> list[Check]:
    """Each subgraph in ONNX Runtime against its PyTorch module; one session at a time keeps memory low."""
    from ..engines.onnxruntime import OrtConfig
    from ..engines.onnxruntime.loader import create_session

    arch = architecture_for(loaded.model)
    dtype = next(loaded.model.parameters()).dtype
    tol = TOLERANCE[manifest.dtype]
    checks = []
    for sub in subgraphs(arch):
        if names is not None and sub.name not in names:
            continue
        session = create_session(manifest.path(sub.name), OrtConfig(opt_level="all"))
        for case, values in _cases(arch, sub, dtype):
            with torch.no_grad():
                ref = sub.module(*values.values())
            ref = ref if isinstance(ref, tuple) else (ref,)
            got = session.run([o.name for o in sub.outputs], {k: v.numpy() for k, v in values.items()})
            diff = max(float((torch.from_numpy(g).float() - r.float()).abs().max()) for g, r in zip(got, ref))
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
    from ..runtime import Runtime

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
    report = Report(check_subgraphs(manifest, loaded, log))
    if end_to_end:
        if manifest.dtype == "float32":
            check_end_to_end(manifest, loaded, report, log)
        else:
            log("  end-to-end token check skipped: it needs fp32 (fp16 rounding makes greedy ties diverge legitimately)")
            report.end_to_end = "not run"
    return report

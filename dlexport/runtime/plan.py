"""plan.json: which layers run and when a token may exit, validated on load against the model it is used with.

The format is documented by ``dlexport/schemas/plan.schema.json``; this module adds the checks a schema cannot make
(layer ranges, order, the model fingerprint) and turns every failure into a message that names the field and the fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from .. import checks
from ..errors import InputError, echo
from ..files import read_json, write_json_atomic

FORMAT, VERSION = "dlexport-plan", 1
CRITERIA = ("top1_prob", "gap", "classifier")
FEATURES = ("top1_prob", "gap", "layer_fraction")
MAX_PLAN_BYTES = 16 << 20  # the largest calibrated plans are a few hundred KB
MAX_LAYERS = 1024  # deeper than any decoder-only LLM; bounds every list of layers
MAX_ENTRIES = 1 << 16  # layer indices in one plan, all lists together (a full ladder of 300 layers: 45150)
MAX_TEXT = 1_000  # name, source, fingerprint, adapter file names


class PlanError(InputError):
    pass


@dataclass(frozen=True)
class AdapterRef:
    """A calibrated exit head: ONNX adapter (hidden -> hidden) run before the head at one exit layer."""

    layer: int
    file: str  # relative to the plan's folder
    sha256: str


@dataclass(frozen=True)
class ExitPolicy:
    layers: tuple[int, ...]
    criterion: str
    threshold: float
    min_depth: int = 0
    features: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    bias: float = 0.0
    adapters: tuple[AdapterRef, ...] = ()
    folder: str = field(default="", compare=False)  # where adapter files resolve; set by load_plan

    def adapter_path(self, layer: int) -> Path | None:
        ref = next((a for a in self.adapters if a.layer == layer), None)
        return None if ref is None else (Path(self.folder or ".").resolve() / ref.file).resolve()

    def to_json(self) -> dict:
        d = {"layers": list(self.layers), "criterion": self.criterion, "threshold": self.threshold,
             "min_depth": self.min_depth}
        if self.criterion == "classifier":
            d["classifier"] = {"features": list(self.features), "weights": list(self.weights), "bias": self.bias}
        if self.adapters:
            d["adapters"] = [{"layer": a.layer, "file": a.file, "sha256": a.sha256} for a in self.adapters]
        return d


@dataclass(frozen=True)
class DraftHeadRef:
    """A cheap draft head: the exit head over a calibrated vocabulary subset (ONNX, hidden -> subset logits)."""

    file: str  # relative to the plan's folder
    sha256: str
    tokens: int  # size of the subset (its token ids are in the file's metadata)


@dataclass(frozen=True)
class Draft:
    layers: tuple[int, ...]
    k: int = 4
    adaptive: bool = True
    head: DraftHeadRef | None = None
    folder: str = field(default="", compare=False)  # where the head file resolves; set by load_plan

    def head_path(self) -> Path | None:
        return None if self.head is None else (Path(self.folder or ".").resolve() / self.head.file).resolve()

    def to_json(self) -> dict:
        d = {"layers": list(self.layers), "k": self.k, "adaptive": self.adaptive}
        if self.head:
            d["head"] = {"file": self.head.file, "sha256": self.head.sha256, "tokens": self.head.tokens}
        return d

    def __post_init__(self):
        try:
            checks.integer(self.k, "draft k (tokens drafted per round)", 1, 32, fix="draft between 1 and 32 tokens")
        except InputError as e:
            raise PlanError(str(e)) from None
        if not isinstance(self.adaptive, bool):
            raise PlanError(f"draft 'adaptive' must be true or false, got {echo(self.adaptive)}")


@dataclass(frozen=True)
class Plan:
    fingerprint: str
    num_layers: int
    layers: tuple[int, ...]
    exit: ExitPolicy | None = None
    ladder: tuple[tuple[int, ...], ...] = ()
    draft: Draft | None = None
    name: str = ""
    source: str = ""
    calibration: dict = field(default_factory=dict, compare=False)

    @classmethod
    def full(cls, manifest) -> "Plan":
        return cls(manifest.fingerprint, manifest.num_layers, tuple(range(manifest.num_layers)), name="full",
                   source=manifest.data.get("source", ""))

    @classmethod
    def skip(cls, manifest, layers, **kw) -> "Plan":
        plan = cls(manifest.fingerprint, manifest.num_layers, tuple(layers), source=manifest.data.get("source", ""), **kw)
        plan.check()
        return plan

    # -- JSON ---------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = {"format": FORMAT, "version": VERSION, "name": self.name,
             "model": {"fingerprint": self.fingerprint, "num_layers": self.num_layers, "source": self.source},
             "layers": list(self.layers)}
        if self.exit:
            d["exit"] = self.exit.to_json()
        if self.ladder:
            d["ladder"] = [list(r) for r in self.ladder]
        if self.draft:
            d["draft"] = self.draft.to_json()
        if self.calibration:
            d["calibration"] = self.calibration
        return d

    def save(self, path: Path | str) -> None:
        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def from_json(cls, data: dict, where: str = "plan") -> "Plan":
        _schema_check(data, where)
        m = data["model"]
        num_layers = m["num_layers"]
        ex = data.get("exit")
        exit_policy = None
        if ex:
            clf = ex.get("classifier", {})
            exit_policy = ExitPolicy(tuple(ex["layers"]), ex["criterion"], float(ex["threshold"]), ex.get("min_depth", 0),
                                     tuple(clf.get("features", ())), tuple(clf.get("weights", ())), clf.get("bias", 0.0),
                                     tuple(AdapterRef(a["layer"], a["file"], a["sha256"]) for a in ex.get("adapters", ())))
        dr = data.get("draft")
        plan = cls(
            fingerprint=m["fingerprint"], num_layers=num_layers,
            layers=tuple(data.get("layers", range(num_layers))), exit=exit_policy,
            ladder=tuple(tuple(r) for r in data.get("ladder", ())),
            draft=Draft(tuple(dr["layers"]), dr.get("k", 4), dr.get("adaptive", True),
                        DraftHeadRef(**dr["head"]) if "head" in dr else None) if dr else None,
            name=data.get("name", ""), source=m.get("source", ""), calibration=data.get("calibration", {}),
        )
        plan.check(where)
        return plan

    # -- checks -------------------------------------------------------------------------------------------------
    def check(self, where: str = "plan") -> None:
        """Every field's type and range, and how the fields fit together; the same for JSON and Python plans."""
        try:
            self._check(where)
        except PlanError:
            raise
        except InputError as e:
            raise PlanError(str(e)) from None

    def _check(self, where: str) -> None:
        for key in ("fingerprint", "name", "source"):
            checks.text(getattr(self, key), f"{where}: '{key}'", MAX_TEXT)
        n = checks.integer(self.num_layers, f"{where}: 'model.num_layers'", 1, MAX_LAYERS)
        layers = _layers(self.layers, n, f"{where}: 'layers'")
        if not layers:
            raise PlanError(f"{where}: 'layers' is empty; a plan must execute at least one layer")
        if self.exit:
            e = self.exit
            if not isinstance(e, ExitPolicy):
                raise PlanError(f"{where}: 'exit' must be an ExitPolicy, got {type(e).__name__}")
            exits = _layers(e.layers, n, f"{where}: 'exit.layers'")
            if not exits:
                raise PlanError(f"{where}: 'exit.layers' is empty; name at least one exit layer or drop 'exit'")
            missing = sorted(set(exits) - set(layers))
            if missing:
                raise PlanError(f"{where}: 'exit.layers' {missing[:8]} are not executed by 'layers'; exits must be "
                                "taken after a layer that runs: add them to 'layers' or drop them from 'exit.layers'")
            if e.criterion not in CRITERIA:
                raise PlanError(f"{where}: 'exit.criterion' is {echo(e.criterion)}; choose one of {', '.join(CRITERIA)}")
            lo, hi = (0.0, 1.0) if e.criterion in ("top1_prob", "gap") else (None, None)
            checks.number(e.threshold, f"{where}: 'exit.threshold'", lo, hi,
                          fix=f"criterion {e.criterion!r} scores lie in [0, 1]" if lo is not None else "")
            checks.integer(e.min_depth, f"{where}: 'exit.min_depth'", 0, n)
            if e.criterion == "classifier":
                if len(e.features) != len(e.weights):
                    raise PlanError(f"{where}: 'exit.classifier' has {len(e.features)} features but {len(e.weights)} "
                                    "weights; give one weight per feature")
                unknown = [f for f in e.features if f not in FEATURES]
                if unknown or not e.features:
                    raise PlanError(f"{where}: 'exit.classifier.features' must be some of {', '.join(FEATURES)}, "
                                    f"got {echo(list(e.features))}")
                for i, w in enumerate(e.weights):
                    checks.number(w, f"{where}: 'exit.classifier.weights[{i}]'")
                checks.number(e.bias, f"{where}: 'exit.classifier.bias'")
            elif e.features or e.weights or e.bias:
                raise PlanError(f"{where}: classifier features, weights or bias are given but 'exit.criterion' is "
                                f"{e.criterion!r}, which does not use them: drop them or use criterion 'classifier'")
            for i, a in enumerate(e.adapters):
                checks.integer(a.layer, f"{where}: 'exit.adapters[{i}].layer'", 0, n - 1)
                checks.text(a.file, f"{where}: 'exit.adapters[{i}].file'", MAX_TEXT)
                checks.text(a.sha256, f"{where}: 'exit.adapters[{i}].sha256'", 64)
            stray = sorted({a.layer for a in e.adapters} - set(exits))
            if stray:
                raise PlanError(f"{where}: 'exit.adapters' are given for layers {stray[:8]}, which are not exit "
                                "layers: add them to 'exit.layers' or drop their adapters")
        if len(self.ladder) > MAX_LAYERS:
            raise PlanError(f"{where}: 'ladder' has {len(self.ladder)} rungs; a ladder has at most one per depth")
        previous: set = set()
        for i, rung in enumerate(self.ladder):
            rung = set(_layers(rung, n, f"{where}: 'ladder[{i}]'"))
            if i and not previous <= rung:
                raise PlanError(f"{where}: 'ladder[{i}]' does not contain 'ladder[{i - 1}]'; rungs must be nested, "
                                "smallest first")
            previous = rung
        if self.draft:
            if not isinstance(self.draft, Draft):
                raise PlanError(f"{where}: 'draft' must be a Draft, got {type(self.draft).__name__}")
            if not _layers(self.draft.layers, n, f"{where}: 'draft.layers'"):
                raise PlanError(f"{where}: 'draft.layers' is empty; a draft runs at least one layer")
            h = self.draft.head
            if h is not None:
                if not isinstance(h, DraftHeadRef):
                    raise PlanError(f"{where}: 'draft.head' must be a DraftHeadRef, got {type(h).__name__}")
                checks.text(h.file, f"{where}: 'draft.head.file'", MAX_TEXT)
                checks.text(h.sha256, f"{where}: 'draft.head.sha256'", 64)
                checks.integer(h.tokens, f"{where}: 'draft.head.tokens'", 1, None)

    def check_model(self, manifest, where: str = "plan") -> None:
        """Refuse a plan made for another model (by fingerprint) or another depth."""
        if self.num_layers != manifest.num_layers or self.fingerprint != manifest.fingerprint:
            raise PlanError(
                f"{where} was made for model {self.source or '?'} (fingerprint {self.fingerprint}, "
                f"{self.num_layers} layers), but this export is {manifest.data.get('source')} (fingerprint "
                f"{manifest.fingerprint}, {manifest.num_layers} layers): calibrate a plan for this model with "
                "`dlexport plan calibrate`, or use the export the plan was made for"
            )


def _layers(layers, n: int, where: str) -> tuple[int, ...]:
    return checks.layer_list(layers, n, where, limit=n)


def _schema() -> dict:
    return json.loads(resources.files("dlexport").joinpath("schemas/plan.schema.json").read_text())


def _schema_check(data, where: str) -> None:
    if not isinstance(data, dict):
        raise PlanError(f"{where}: a plan is a JSON object, got {type(data).__name__}")
    version = data.get("version")
    if data.get("format") == FORMAT and version not in (None, VERSION):
        kind = f"the string {echo(version)}" if isinstance(version, str) else f"version {echo(version)}"
        raise PlanError(f"{where}: plan format {kind} is not supported; this dlexport reads version {VERSION} "
                        f'(write "version": {VERSION}, a number)')
    _size_check(data, where)
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        field_ = ".".join(str(p) for p in e.path) or "(top level)"
        message = e.message if len(e.message) <= 200 else e.message[:200] + "…"
        if e.validator == "additionalProperties":
            known = ", ".join(sorted(e.schema.get("properties", {})))
            raise PlanError(f"{where}: {message} at {field_}; known fields there: {known}. Unknown strategies "
                            "are refused rather than ignored: upgrade dlexport or remove the field")
        raise PlanError(f"{where}: field {field_!r}: {message}. See dlexport/schemas/plan.schema.json")


def _size_check(data: dict, where: str) -> None:
    """Bound every list and string before the schema looks at them, so any plan is refused in well under a second."""
    def get(d, *keys):
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    n = get(data, "model", "num_layers")
    if isinstance(n, int) and not 1 <= n <= MAX_LAYERS:
        raise PlanError(f"{where}: 'model.num_layers' is {n}; it must be in [1, {MAX_LAYERS}]")
    ladder = data.get("ladder")
    lists = {"layers": data.get("layers"), "exit.layers": get(data, "exit", "layers"),
             "exit.adapters": get(data, "exit", "adapters"), "draft.layers": get(data, "draft", "layers"),
             "exit.classifier.features": get(data, "exit", "classifier", "features"),
             "exit.classifier.weights": get(data, "exit", "classifier", "weights"), "ladder": ladder}
    if isinstance(ladder, list) and len(ladder) <= MAX_LAYERS:
        lists.update({f"ladder[{i}]": r for i, r in enumerate(ladder)})
    total = 0
    for key, value in lists.items():
        if isinstance(value, list):
            if len(value) > MAX_LAYERS:
                raise PlanError(f"{where}: '{key}' has {len(value)} entries; the limit is {MAX_LAYERS} (one per layer)")
            total += len(value) if key != "ladder" else 0
    if total > MAX_ENTRIES:
        raise PlanError(f"{where}: the plan lists {total} layer indices in all; the limit is {MAX_ENTRIES}")
    for key in ("name", ("model", "fingerprint"), ("model", "source")):
        value = get(data, *key) if isinstance(key, tuple) else data.get(key)
        if isinstance(value, str) and len(value) > MAX_TEXT:
            name = ".".join(key) if isinstance(key, tuple) else key
            raise PlanError(f"{where}: '{name}' is {len(value)} characters long; the limit is {MAX_TEXT}")


def load_plan(path: Path | str, manifest=None) -> Plan:
    path = Path(path)
    plan = Plan.from_json(read_json(path, "plan", limit=MAX_PLAN_BYTES), where=str(path))
    if manifest is not None:
        plan.check_model(manifest, where=str(path))
    if plan.exit and plan.exit.adapters:
        plan = replace(plan, exit=replace(plan.exit, folder=str(path.resolve().parent)))
        check_adapters(plan.exit, str(path))
    if plan.draft and plan.draft.head:
        plan = replace(plan, draft=replace(plan.draft, folder=str(path.resolve().parent)))
        check_draft_head(plan.draft, str(path))
    return plan


def check_draft_head(d: Draft, where: str = "plan") -> None:
    """Refuse a draft head file that is missing, outside the plan's folder (also through a symlink) or altered."""
    from ..files import sha256_file

    folder = Path(d.folder or ".").resolve()
    p = (folder / d.head.file).resolve()
    if not (p.is_relative_to(folder) and p.is_file() and sha256_file(p) == d.head.sha256):
        raise PlanError(f"{where}: draft head {echo(d.head.file)} is missing, outside the plan's folder, or does not "
                        "match the sha256 in the plan: keep the plan together with its draft/ folder, or re-run "
                        "`dlexport plan calibrate-draft`")


def check_adapters(e: ExitPolicy, where: str = "plan") -> None:
    """Refuse an adapter file that is missing, outside the plan's folder (also through a symlink) or altered.

    One message for all three, so that a plan cannot be used to probe which paths exist outside its folder.
    """
    from ..files import sha256_file

    folder = Path(e.folder or ".").resolve()
    for a in e.adapters:
        p = (folder / a.file).resolve()
        if not (p.is_relative_to(folder) and p.is_file() and sha256_file(p) == a.sha256):
            raise PlanError(f"{where}: exit adapter {echo(a.file)} (layer {a.layer}) is missing, outside the plan's "
                            "folder, or does not match the sha256 in the plan: keep the plan together with its "
                            "adapters/ folder, or re-run `dlexport plan calibrate-exit --adapters`")

"""plan.json: which layers run and when a token may exit, validated on load against the model it is used with.

The format is documented by ``dlexport/schemas/plan.schema.json``; this module adds the checks a schema cannot make
(layer ranges, order, the model fingerprint) and turns every failure into a message that names the field and the fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from ..files import read_json, write_json_atomic

FORMAT, VERSION = "dlexport-plan", 1
CRITERIA = ("top1_prob", "gap", "classifier")


class PlanError(ValueError):
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
        return None if ref is None else Path(self.folder) / ref.file

    def to_json(self) -> dict:
        d = {"layers": list(self.layers), "criterion": self.criterion, "threshold": self.threshold,
             "min_depth": self.min_depth}
        if self.criterion == "classifier":
            d["classifier"] = {"features": list(self.features), "weights": list(self.weights), "bias": self.bias}
        if self.adapters:
            d["adapters"] = [{"layer": a.layer, "file": a.file, "sha256": a.sha256} for a in self.adapters]
        return d


@dataclass(frozen=True)
class Draft:
    layers: tuple[int, ...]
    k: int = 4
    adaptive: bool = True


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
            d["draft"] = {"layers": list(self.draft.layers), "k": self.draft.k, "adaptive": self.draft.adaptive}
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
            draft=Draft(tuple(dr["layers"]), dr.get("k", 4), dr.get("adaptive", True)) if dr else None,
            name=data.get("name", ""), source=m.get("source", ""), calibration=data.get("calibration", {}),
        )
        plan.check(where)
        return plan

    # -- checks -------------------------------------------------------------------------------------------------
    def check(self, where: str = "plan") -> None:
        n = self.num_layers
        _check_layers(self.layers, n, f"{where}: 'layers'")
        if not self.layers:
            raise PlanError(f"{where}: 'layers' is empty; a plan must execute at least one layer")
        if self.exit:
            e = self.exit
            _check_layers(e.layers, n, f"{where}: 'exit.layers'")
            missing = sorted(set(e.layers) - set(self.layers))
            if missing:
                raise PlanError(f"{where}: 'exit.layers' {missing} are not executed by 'layers'; exits must be taken "
                                "after a layer that runs: add them to 'layers' or drop them from 'exit.layers'")
            if e.criterion == "classifier" and len(e.features) != len(e.weights):
                raise PlanError(f"{where}: 'exit.classifier' has {len(e.features)} features but {len(e.weights)} "
                                "weights; give one weight per feature")
            stray = sorted({a.layer for a in e.adapters} - set(e.layers))
            if stray:
                raise PlanError(f"{where}: 'exit.adapters' are given for layers {stray}, which are not exit layers: "
                                "add them to 'exit.layers' or drop their adapters")
            if e.criterion in ("top1_prob", "gap") and not 0.0 <= e.threshold <= 1.0:
                raise PlanError(f"{where}: 'exit.threshold' {e.threshold} is outside [0, 1] for criterion "
                                f"{e.criterion!r}; probabilities and gaps lie in [0, 1]")
        for i, rung in enumerate(self.ladder):
            _check_layers(rung, n, f"{where}: 'ladder[{i}]'")
            if i and not set(self.ladder[i - 1]) <= set(rung):
                raise PlanError(f"{where}: 'ladder[{i}]' does not contain 'ladder[{i - 1}]'; rungs must be nested, "
                                "smallest first")
        if self.draft:
            _check_layers(self.draft.layers, n, f"{where}: 'draft.layers'")

    def check_model(self, manifest, where: str = "plan") -> None:
        """Refuse a plan made for another model (by fingerprint) or another depth."""
        if self.num_layers != manifest.num_layers or self.fingerprint != manifest.fingerprint:
            raise PlanError(
                f"{where} was made for model {self.source or '?'} (fingerprint {self.fingerprint}, "
                f"{self.num_layers} layers), but this export is {manifest.data.get('source')} (fingerprint "
                f"{manifest.fingerprint}, {manifest.num_layers} layers): calibrate a plan for this model with "
                "`dlexport plan calibrate`, or use the export the plan was made for"
            )


def _check_layers(layers, n: int, where: str) -> None:
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise PlanError(f"{where} names layer(s) {bad} out of range: this model has layers 0..{n - 1}")
    if len(set(layers)) != len(layers):
        dup = sorted({i for i in layers if list(layers).count(i) > 1})
        raise PlanError(f"{where} repeats layer(s) {dup}; list each layer once")
    if list(layers) != sorted(layers):
        raise PlanError(f"{where} is not in ascending order ({list(layers)}); layers run bottom-up: sort them")


def _schema() -> dict:
    return json.loads(resources.files("dlexport").joinpath("schemas/plan.schema.json").read_text())


def _schema_check(data, where: str) -> None:
    import jsonschema

    if not isinstance(data, dict):
        raise PlanError(f"{where}: a plan is a JSON object, got {type(data).__name__}")
    if data.get("format") == FORMAT and data.get("version") not in (None, VERSION):
        raise PlanError(f"{where}: plan format version {data.get('version')} is not supported; this dlexport reads "
                        f"version {VERSION}")
    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        field_ = ".".join(str(p) for p in e.path) or "(top level)"
        if e.validator == "additionalProperties":
            known = ", ".join(sorted(e.schema.get("properties", {})))
            raise PlanError(f"{where}: {e.message} at {field_}; known fields there: {known}. Unknown strategies "
                            "are refused rather than ignored: upgrade dlexport or remove the field")
        raise PlanError(f"{where}: field {field_!r}: {e.message}. See dlexport/schemas/plan.schema.json")


def load_plan(path: Path | str, manifest=None) -> Plan:
    plan = Plan.from_json(read_json(Path(path), "plan"), where=str(path))
    if manifest is not None:
        plan.check_model(manifest, where=str(path))
    if plan.exit and plan.exit.adapters:
        plan = replace(plan, exit=replace(plan.exit, folder=str(Path(path).resolve().parent)))
        _check_adapters(plan.exit, str(path))
    return plan


def _check_adapters(e: ExitPolicy, where: str) -> None:
    """Refuse a missing or altered adapter file rather than exit on a head it was not calibrated with."""
    from ..files import sha256_file

    for a in e.adapters:
        p = e.adapter_path(a.layer)
        if not p.exists():
            raise PlanError(f"{where}: exit adapter {p} is missing; copy the plan together with its adapters/ "
                            "folder, or re-run `dlexport plan calibrate-exit --adapters`")
        if sha256_file(p) != a.sha256:
            raise PlanError(f"{where}: exit adapter {p} does not match the sha256 in the plan: the file was "
                            "replaced or is corrupt; re-run `dlexport plan calibrate-exit --adapters`")

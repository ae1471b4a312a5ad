"""``manifest.json``: what an export folder holds, written by the exporter and trusted by everything downstream."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CorruptFileError, MissingFileError, echo
from .files import read_json, sha256_file, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "dlexport-export"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16")
ARCH_NUMBERS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "max_positions")
MAX_LAYERS = 1024


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config and every weight's bytes, so a plan or engine can tell which model it was made for.

    Computed on the fp32 weights before any dtype change: fp32 and fp16 exports of one model share a fingerprint.
    """
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()[:32]


def _are_specs(specs) -> bool:
    return isinstance(specs, list) and bool(specs) and all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("shape"), list) for s in specs)


def layer_name(index: int, num_layers: int) -> str:
    return f"layer_{index:0{max(2, len(str(num_layers - 1)))}d}"


@dataclass
class Manifest:
    folder: Path
    data: dict = field(repr=False)

    # -- reading --------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: Path | str) -> "Manifest":
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingFileError(f"export folder {folder} does not exist; create it with `dlexport export`")
        if not (folder / MANIFEST).exists() and (folder / "engines.json").exists():
            raise MissingFileError(f"{folder} is an engine folder (engines.json), not an export: give the export it "
                                   "was built from, or use a command that takes engine folders")
        data = read_json(folder / MANIFEST, "export manifest")
        if data.get("format") != FORMAT:
            raise CorruptFileError(f"{folder / MANIFEST} is not a dlexport export manifest (format "
                                   f"{echo(data.get('format'))})")
        if data.get("format_version") != FORMAT_VERSION:
            raise CorruptFileError(
                f"{folder / MANIFEST} has manifest format {echo(data.get('format_version'))}, this dlexport "
                f"reads {FORMAT_VERSION}: re-export it"
            )
        manifest = cls(folder, data)
        manifest.check(folder / MANIFEST)
        return manifest

    def check(self, where) -> None:
        """Refuse a manifest whose fields are missing, of the wrong type, or disagree with each other, e.g. edited
        architecture numbers that would run fewer layers or the wrong cache shape without a word."""
        d = self.data

        def bad(problem: str):
            raise CorruptFileError(f"{where}: {problem}; the manifest is damaged or was edited: re-export the model "
                                   "(`dlexport export`)")

        arch = d.get("architecture")
        if not isinstance(arch, dict):
            bad("'architecture' is missing or not an object")
        for key in ARCH_NUMBERS:
            v = arch.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f"'architecture.{key}' is {echo(v)}, not a positive integer")
        if arch["num_layers"] > MAX_LAYERS:
            bad(f"'architecture.num_layers' is {arch['num_layers']}, more than any model has")
        if not isinstance(d.get("fingerprint"), str):
            bad("'fingerprint' is missing")
        if d.get("dtype") not in DTYPES:
            bad(f"'dtype' is {echo(d.get('dtype'))}, not one of {', '.join(DTYPES)}")
        if not isinstance(d.get("rotary"), bool):
            bad("'rotary' is not true or false")
        subs = d.get("subgraphs")
        if not isinstance(subs, dict):
            bad("'subgraphs' is missing or not an object")
        expected = ["embed", "head"] + [self.layer_key(i) for i in range(self.num_layers)]
        missing = [n for n in expected if n not in subs]
        if missing:
            bad(f"'subgraphs' lacks {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''} "
                f"(architecture.num_layers is {self.num_layers})")
        if len(subs) != len(expected):
            bad(f"'subgraphs' has {len(subs)} entries but architecture.num_layers {self.num_layers} needs "
                f"{len(expected)}")
        for name in expected:
            s = subs[name]
            ok = isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("files"), list) \
                and all(isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
                        and isinstance(f.get("sha256"), str) for f in s["files"]) and s["files"] \
                and _are_specs(s.get("inputs")) and _are_specs(s.get("outputs"))
            if not ok:
                bad(f"subgraph {name!r} lacks its file, files (path, size, sha256), inputs or outputs")
            for f in s["files"]:
                if not (self.folder / f["path"]).resolve().is_relative_to(self.folder.resolve()):
                    bad(f"subgraph {name!r} names the file {echo(f['path'])} outside the folder")
        for name, side, tensor, axis, key in self._shape_facts():
            spec = next((x for x in subs[name][side] if x["name"] == tensor), None)
            if spec is None:
                bad(f"subgraph {name!r} has no {side[:-1]} {tensor!r}")
            if len(spec["shape"]) <= axis or spec["shape"][axis] != arch[key]:
                bad(f"architecture.{key} is {arch[key]} but {name}'s {tensor} has shape {echo(spec['shape'])}")
        special = d.get("special_tokens", {})
        eos = special.get("eos_token_ids", []) if isinstance(special, dict) else None
        ids = (eos or []) + [special.get(k) for k in ("pad_token_id", "bos_token_id") if special.get(k) is not None] \
            if isinstance(eos, list) else None
        if ids is None or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < arch["vocab_size"]
                                  for i in ids):
            bad("'special_tokens' must hold token ids within the vocabulary")

    def _shape_facts(self):
        """(subgraph, side, tensor, axis, architecture number): the I/O shapes the numbers must agree with."""
        for i in range(self.num_layers):
            layer = self.layer_key(i)
            yield layer, "inputs", "hidden_states", 2, "hidden_size"
            yield layer, "inputs", f"past_key_values.{i}.key", 1, "num_kv_heads"
            yield layer, "inputs", f"past_key_values.{i}.key", 3, "head_dim"
        yield "embed", "outputs", "hidden_states", 2, "hidden_size"
        yield "head", "inputs", "hidden_states", 2, "hidden_size"
        yield "head", "outputs", "logits", 2, "vocab_size"

    def check_graphs(self, names) -> None:
        """The ONNX files' own input/output shapes equal the manifest's.

        Parsing a graph parses its inline weights too, so callers pass one layer: with ``check``'s cross-checks that
        pins hidden size, KV heads and head dim to the files (the sha256 check pins the files to the manifest).
        """
        import onnx

        for name in names:
            path = self.path(name)
            try:
                graph = onnx.load(str(path), load_external_data=False).graph
            except Exception as e:  # a protobuf that does not parse
                raise CorruptFileError(f"{path} is not a readable ONNX model ({type(e).__name__}): re-export "
                                       f"into {self.folder}") from None
            found = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                     for v in list(graph.input) + list(graph.output)}
            sub = self.subgraph(name)
            for s in sub["inputs"] + sub["outputs"]:
                if found.get(s["name"]) != list(s["shape"]):
                    raise CorruptFileError(
                        f"{path}: {s['name']} has shape {found.get(s['name'])} in the ONNX graph but {s['shape']} in "
                        f"{self.folder / MANIFEST}: the manifest was edited or belongs to another export; re-export "
                        f"into {self.folder}")

    @property
    def fingerprint(self) -> str:
        return self.data["fingerprint"]

    @property
    def arch(self) -> dict:
        return self.data["architecture"]

    @property
    def num_layers(self) -> int:
        return self.arch["num_layers"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def kv(self) -> str:
        """"inplace" or "portable" (exporter/kv_inplace.py); exports made before the flavours existed are portable."""
        return self.data.get("kv", "portable")

    @property
    def rotary(self) -> bool:
        return self.data["rotary"]

    def subgraph(self, name: str) -> dict:
        return self.data["subgraphs"][name]

    def layer_key(self, index: int) -> str:
        return layer_name(index, self.num_layers)

    def path(self, name: str) -> Path:
        return self.folder / self.subgraph(name)["file"]

    def tokenizer_dir(self) -> Path | None:
        t = self.data.get("tokenizer")
        return self.folder / t if t else None

    def verify_files(self, names=None) -> None:
        """Refuse missing or altered subgraph files, naming the file and the fix."""
        for name in names or self.data["subgraphs"]:
            for f in self.subgraph(name)["files"]:
                p = self.folder / f["path"]
                if not p.is_file():
                    raise MissingFileError(f"{p} is missing from the export: re-run `dlexport export` into {self.folder}")
                if p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
                    raise CorruptFileError(
                        f"{p} does not match its manifest entry (size or sha256 differ): the file is corrupt or "
                        f"was replaced. Re-run `dlexport export` into {self.folder} to rewrite it."
                    )

    # -- writing --------------------------------------------------------------------------------------------------
    def save(self) -> None:
        write_json_atomic(self.folder / MANIFEST, self.data)

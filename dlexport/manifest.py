"""``manifest.json``: what an export folder holds, written by the exporter and trusted by everything downstream."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import read_json, sha256_file, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "dlexport-export"
FORMAT_VERSION = 1


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
            raise FileNotFoundError(f"export folder {folder} does not exist; create it with `dlexport export`")
        data = read_json(folder / MANIFEST, "export manifest")
        if data.get("format") != FORMAT:
            raise ValueError(f"{folder / MANIFEST} is not a dlexport export manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{folder} was exported with manifest format {data.get('format_version')}, this dlexport reads "
                f"{FORMAT_VERSION}: re-export it"
            )
        return cls(folder, data)

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
                if not p.exists():
                    raise FileNotFoundError(f"{p} is missing from the export: re-run `dlexport export` into {self.folder}")
                if p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
                    raise ValueError(
                        f"{p} does not match its manifest entry (size or sha256 differ): the file is corrupt or "
                        f"was replaced. Re-run `dlexport export` into {self.folder} to rewrite it."
                    )

    # -- writing --------------------------------------------------------------------------------------------------
    def save(self) -> None:
        write_json_atomic(self.folder / MANIFEST, self.data)

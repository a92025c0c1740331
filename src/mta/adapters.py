"""LoRA updates as plain tensors, and the bridge to PEFT adapters.

Fusion, stacking, export and batched serving all need the raw factors of ΔW = B·A; PEFT keeps them
inside its layers with a separate scaling. `LoraWeights` folds the scaling into B so that every
consumer sees one convention, and converts to and from PEFT's adapter folders and layers.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from torch import Tensor, nn

from mta.io import MTAError, atomic_dir, atomic_save_tensors, atomic_write_json, load_tensors, read_json

_PREFIX = "base_model.model."


@dataclass
class LoraWeights:
    """Per module path: (A [r, in], B [out, r]) with ΔW = B @ A (scaling folded into B)."""

    modules: dict[str, tuple[Tensor, Tensor]]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())

    def delta(self, name: str) -> Tensor:
        a, b = self.modules[name]
        return b @ a

    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "LoraWeights":
        return LoraWeights({n: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)) for n, (a, b) in self.modules.items()})

    def padded(self, rank: int) -> "LoraWeights":
        """Zero rows of A / columns of B: the same ΔW at a uniform rank, as one PEFT config needs."""
        out = {}
        for n, (a, b) in self.modules.items():
            pad = rank - a.shape[0]
            out[n] = (torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)) if pad else (a, b)
        return LoraWeights(out)

    @staticmethod
    def concat(parts: list["LoraWeights"]) -> "LoraWeights":
        """Σ ΔW of all parts exactly, by stacking ranks."""
        names = sorted(set().union(*(p.modules for p in parts)))
        out = {}
        for n in names:
            present = [p.modules[n] for p in parts if n in p.modules]
            out[n] = (torch.cat([a for a, _ in present]), torch.cat([b for _, b in present], 1))
        return LoraWeights(out)

    # -- PEFT adapter folders -------------------------------------------------------------------------
    @classmethod
    def from_peft_dir(cls, path: str | Path) -> "LoraWeights":
        path = Path(path)
        cfg = read_json(path / "adapter_config.json", "adapter config")
        if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
            raise MTAError(f"{path}: only plain LoRA adapters are supported (got {cfg.get('peft_type')}, use_dora={cfg.get('use_dora')})")
        tensors = load_tensors(path / "adapter_model.safetensors")
        return cls.from_peft_state_dict(tensors, cfg, str(path))

    @classmethod
    def from_peft_state_dict(cls, tensors: dict[str, Tensor], cfg: dict, where: str = "adapter") -> "LoraWeights":
        r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
        ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        modules: dict[str, tuple[Tensor, Tensor]] = {}
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            name = key.split(".lora_A.")[0].removeprefix(_PREFIX)
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in tensors:
                raise MTAError(f"{where}: {b_key} is missing")
            # PEFT's own matching: a pattern key is a regex for a suffix of the module path ("q_proj", "layers.0.q_proj")
            rank = ranks.get(get_pattern_key(ranks, name), r)
            alph = alphas.get(get_pattern_key(alphas, name), alpha)
            scale = alph / (rank**0.5 if cfg.get("use_rslora") else rank)
            modules[name] = (a.float(), tensors[b_key].float() * scale)
        if not modules:
            raise MTAError(f"{where}: no LoRA tensors found")
        return cls(modules)

    def peft_state_dict(self) -> dict[str, Tensor]:
        sd = {}
        for n, (a, b) in self.modules.items():
            sd[f"{_PREFIX}{n}.lora_A.weight"] = a
            sd[f"{_PREFIX}{n}.lora_B.weight"] = b
        return sd

    def lora_config(self) -> LoraConfig:
        r = self.rank
        return LoraConfig(r=r, lora_alpha=r, target_modules=sorted(self.modules), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")

    def save_peft_dir(self, path: str | Path, base_model: str | None = None, extra: dict[str, Any] | None = None) -> None:
        """A standard PEFT adapter folder (scaling 1), loadable by PeftModel.from_pretrained and vLLM; `extra`: more
        JSON files ({name: content}) written with it in one atomic step."""
        w = self.padded(self.rank)
        cfg = w.lora_config()
        cfg.base_model_name_or_path = base_model
        with atomic_dir(path) as tmp:
            cfg.save_pretrained(tmp)
            atomic_save_tensors(tmp / "adapter_model.safetensors", w.peft_state_dict())
            for name, content in (extra or {}).items():
                atomic_write_json(tmp / name, content)


def save_adapter(model: PeftModel, folder: str | Path, **kwargs) -> None:
    """PEFT's save_pretrained without the model card it writes beside the weights: nothing that serves reads it."""
    model.save_pretrained(folder, **kwargs)
    (Path(folder) / "README.md").unlink(missing_ok=True)


def check_fits(model: nn.Module, weights: LoraWeights, what: str = "adapter") -> dict[str, nn.Linear]:
    """A clear error instead of PEFT's shape mismatch deep inside load_state_dict; returns the base linear layers."""
    mods = dict(model.named_modules())
    layers = {}
    for name, (a, b) in weights.modules.items():
        layer = mods.get(name) or mods.get(_PREFIX + name)
        layer = getattr(layer, "base_layer", layer)
        if not isinstance(layer, nn.Linear):
            raise MTAError(f"{what} does not fit the base model: it has no linear layer {name!r}")
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features or a.shape[0] != b.shape[1]:
            raise MTAError(
                f"{what} does not fit the base model: {name} is {layer.out_features}x{layer.in_features}, "
                f"the adapter gives B {tuple(b.shape)} and A {tuple(a.shape)}"
            )
        layers[name] = layer
    return layers


@contextmanager
def folded(model: nn.Module, weights: LoraWeights | None):
    """`weights` added into the base layers' W for the duration; the original weights are put back untouched.

    A frozen adapter run as LoRA layers took 13–21 % of a stacked LoRA's training time (benchmarks/README.md);
    folded into W it costs one addition. The originals are swapped back, not subtracted, so no rounding is
    left behind; the price is a second copy of the touched weights while the context lasts.
    """
    if weights is None:
        yield model
        return
    layers = check_fits(model, weights)
    originals = {name: layer.weight for name, layer in layers.items()}
    try:
        with torch.no_grad():
            for name, layer in layers.items():
                a, b = weights.modules[name]
                w = originals[name]
                total = torch.addmm(w.float(), b.to(w.device, torch.float32), a.to(w.device, torch.float32))  # W + B·A, one pass
                layer.weight = nn.Parameter(total.to(w.dtype), requires_grad=False)
        yield model
    finally:
        for name, layer in layers.items():
            layer.weight = originals[name]


def delete_adapter(model: PeftModel, adapter_name: str) -> None:
    """PEFT's delete_adapter, without its warning that the adapter was active: replacing it is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        model.delete_adapter(adapter_name)


def _added(model: nn.Module, config: LoraConfig, adapter_name: str, **kwargs) -> PeftModel:
    """`model` with a new adapter `adapter_name` (one of that name replaced; a plain model wrapped first)."""
    if not isinstance(model, PeftModel):
        return get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    if adapter_name in model.peft_config:
        delete_adapter(model, adapter_name)
    model.add_adapter(adapter_name, config, **kwargs)
    return model


def fresh_adapter(model: nn.Module, config: LoraConfig, adapter_name: str, seed: int) -> PeftModel:
    """Adapter `adapter_name` newly initialized from `seed` (a plain model is wrapped first), active and trainable.

    One of that name and config is a slot: its layers are initialized again in place. Adding an adapter to a model that
    already has many adapter layers costs PEFT ~0.3 s on the default model (it checks every module against every
    existing adapter layer), as much as the stack's training steps at 2 items. Fresh or reused, the layers take
    PEFT's own init after `seed`, in module order, so a user's stack does not depend on what the model held before.
    """
    model_type = model.config.model_type
    if not (isinstance(model, PeftModel) and adapter_name in model.peft_config
            and _settings(model.peft_config[adapter_name], model_type) == _settings(config, model_type)):
        model = _added(model, config, adapter_name)
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            module.reset_lora_parameters(adapter_name, config.init_lora_weights)
    model.set_adapter(adapter_name)  # active and trainable, as get_peft_model leaves it
    return model


def _settings(config: LoraConfig, model_type: str) -> dict:
    """What shapes an adapter's layers. PEFT stores target_modules as a set, filled with its default for the
    architecture when none were named."""
    d = config.to_dict()
    modules = d["target_modules"] or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    d["target_modules"] = sorted(modules) if isinstance(modules, (list, set)) else modules
    return {k: v for k, v in d.items() if k not in ("base_model_name_or_path", "revision", "inference_mode")}


def attach(model: nn.Module, weights: LoraWeights, adapter_name: str) -> PeftModel:
    """Add `weights` as a PEFT adapter named `adapter_name`; wraps a plain model on first use.

    PEFT's injection, ~0.3 s for every linear layer of the default model, was most of what MTA spent per user
    outside its training steps (benchmarks/README.md, Cost and time). So an adapter of that name on the same modules
    at the same rank is a slot: `weights` are copied into its layers, bit for bit what a new adapter would hold.
    Otherwise the adapter's layers are made empty (PEFT's low_cpu_mem_usage) and take copies of `weights`' tensors.
    """
    check_fits(model, weights)
    w = weights.padded(weights.rank)
    config, state = w.lora_config(), w.peft_state_dict()
    if isinstance(model, PeftModel) and adapter_name in model.peft_config:
        old = model.peft_config[adapter_name]  # PEFT may store its target_modules shortened: the layers are compared
        slot = {n: p for n, p in model.named_parameters() if f".{adapter_name}." in n}
        named = {f"{k.removesuffix('.weight')}.{adapter_name}.weight": v for k, v in state.items()}
        if (old.r, old.lora_alpha) == (config.r, config.lora_alpha) and slot.keys() == named.keys() and \
                all(slot[k].shape == v.shape for k, v in named.items()):
            with torch.no_grad():
                for key, value in named.items():
                    slot[key].copy_(value)  # into the slot's device and dtype
            return model
    model = _added(model, config, adapter_name, low_cpu_mem_usage=True)
    ref = next(model.parameters())
    state = {k: v.to(ref.device, ref.dtype, copy=True) for k, v in state.items()}  # owned: never a bank's
    set_peft_model_state_dict(model, state, adapter_name=adapter_name, low_cpu_mem_usage=True)
    return model


def extract(model: PeftModel, adapter_name: str) -> LoraWeights:
    """The factors of one adapter of a live PEFT model, scaling folded in."""
    modules = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and adapter_name in module.lora_A:
            a = module.lora_A[adapter_name].weight.detach().float().cpu()
            b = module.lora_B[adapter_name].weight.detach().float().cpu() * module.scaling[adapter_name]
            modules[name] = (a.clone(), b.clone())
    if not modules:
        raise MTAError(f"the model has no adapter named {adapter_name!r}")
    return LoraWeights(modules)

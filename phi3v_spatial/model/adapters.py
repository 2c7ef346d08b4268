"""LoRA adapters (PEFT) on a loaded Phi3VForCausalLM: load several, switch, disable, scale, merge.

LoRA layers are injected into the model object itself, so callers keep calling ``model(...)``/``model.generate``
and the manager only changes which adapter those layers apply.
"""
from __future__ import annotations

import json
import os

import torch

# Phi-3 CookBook LoRA targets for the language model (fused projections keep the official names).
DEFAULT_LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# Optional extra targets: CLIP tower linears and the image projector (CookBook, unless --freeze_vision_model).
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "img_projection.0", "img_projection.2")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(RuntimeError):
    """A missing, invalid or incompatible adapter; the message names the directory and the problem."""


def lora_config(r: int = 16, lora_alpha: int | None = None, lora_dropout: float = 0.0, targets=DEFAULT_LORA_TARGETS,
                include_vision: bool = False, init_lora_weights=True, modules_to_save=None):
    """A peft LoraConfig for this model (alpha defaults to 2*r, as in the CookBook).

    ``modules_to_save``: modules the adapter carries a fully trained copy of (PEFT ``modules_to_save``),
    e.g. ``["vision_embed_tokens"]`` for the whole (small) vision tower + projector of the embedded model."""
    from peft import LoraConfig

    modules = list(targets) + (list(VISION_LORA_TARGETS) if include_vision else [])
    return LoraConfig(r=r, lora_alpha=lora_alpha if lora_alpha is not None else 2 * r, lora_dropout=lora_dropout,
                      target_modules=modules, bias="none", task_type="CAUSAL_LM", init_lora_weights=init_lora_weights,
                      modules_to_save=list(modules_to_save) if modules_to_save else None)


def check_adapter_dir(path: str) -> dict:
    """Validate an adapter directory and return its adapter_config.json contents."""
    if not path or not os.path.isdir(path):
        raise AdapterError(f"adapter directory {path!r} does not exist")
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"{path} has no adapter_config.json (not a PEFT adapter directory)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"{cfg_path} is not valid JSON: {err}") from err
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{path}: only LoRA adapters are supported, adapter_config.json says peft_type={cfg.get('peft_type')!r}")
    if not any(os.path.isfile(os.path.join(path, w)) for w in ADAPTER_WEIGHTS):
        raise AdapterError(f"{path} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return cfg


class AdapterManager:
    """Named LoRA adapters on one model. ``active`` is "" when the base model is in use."""

    def __init__(self, model):
        self.model = model
        self._peft = None
        self._paths: dict[str, str] = {}
        self._active = ""
        self._scale = 1.0
        self._merged = False

    @property
    def available(self) -> list[str]:
        return list(self._paths)

    @property
    def active(self) -> str:
        return self._active

    @property
    def scale(self) -> float:
        return self._scale if self._active else 0.0

    @property
    def merged(self) -> bool:
        return self._merged

    def load(self, name: str, path: str) -> None:
        """Load the adapter in ``path`` as ``name`` (the active adapter does not change)."""
        if not name or not isinstance(name, str):
            raise AdapterError("adapter name must be a non-empty string")
        if name in self._paths:
            raise AdapterError(f"an adapter named {name!r} is already loaded (from {self._paths[name]})")
        if name.lower() == "none" or "." in name or hasattr(torch.nn.Module, name):
            # PEFT stores adapters as module attributes: "eval", "train", "to", dotted names... would clash
            raise AdapterError(f"adapter name {name!r} is reserved; choose another name (e.g. {name}_adapter)")
        check_adapter_dir(path)
        was_merged = self._merged
        if was_merged:
            self.unmerge()
        try:
            if self._peft is None:
                from peft import PeftModel

                self._peft = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
                result = None
            else:
                result = self._peft.load_adapter(path, adapter_name=name, is_trainable=False)
        except AdapterError:
            raise
        except Exception as err:  # peft raises ValueError/KeyError/RuntimeError for adapters of another base
            raise AdapterError(f"adapter {name!r} from {path} does not fit this model: {err}") from err
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            self._peft.delete_adapter(name)
            raise AdapterError(f"adapter {name!r} from {path} has tensors this model has no place for: {unexpected[:10]}")
        self._paths[name] = path
        self._apply()
        if was_merged:
            self.merge()

    def activate(self, name: str | None, scale: float = 1.0) -> None:
        """Use adapter ``name`` with its LoRA update multiplied by ``scale``; None or "" = the base model."""
        name = name or ""
        if name and name not in self._paths:
            raise AdapterError(f"unknown adapter {name!r}; loaded: {self.available or 'none'}")
        if not isinstance(scale, (int, float)) or scale != scale:
            raise AdapterError(f"adapter scale must be a number, got {scale!r}")
        if self._merged:
            self.unmerge()
        self._active, self._scale = name, float(scale)
        self._apply()

    def disable(self) -> None:
        """Back to the base model (adapters stay loaded)."""
        self.activate(None)

    def touches_vision(self, name: str | None = None) -> bool:
        """Whether adapter ``name`` (default: the active one) changes the vision tower or the image projector.

        Image embeddings computed under the base model stay valid for adapters that only change the language model.
        """
        name = self._active if name is None else name
        if not name:
            return False
        for mod_name, module in self.model.named_modules():
            if ".vision_embed_tokens" not in f".{mod_name}":
                continue
            lora_a = getattr(module, "lora_A", None)
            if lora_a is not None and name in lora_a:
                return True
            saved = getattr(module, "modules_to_save", None)  # PEFT ModulesToSaveWrapper
            if saved is not None and hasattr(saved, "keys") and name in saved.keys():
                return True
        return False

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def _apply(self) -> None:
        if self._peft is None:
            return
        tuner = self._peft.base_model
        if not self._active:
            tuner.disable_adapter_layers()
            return
        tuner.enable_adapter_layers()
        tuner.set_adapter(self._active)
        for layer in self._lora_layers():
            layer.set_scale(self._active, self._scale)
        self.model.eval()

    def merge(self) -> None:
        """Fold the active adapter into the base weights (faster inference; undone by unmerge/activate)."""
        if not self._active:
            raise AdapterError("no adapter is active: activate one before merging")
        if not self._merged:
            with torch.no_grad():
                self._peft.base_model.merge_adapter([self._active])
            self._merged = True

    def unmerge(self) -> None:
        """Subtract a merged adapter again (weights equal the base up to float rounding)."""
        if self._merged:
            with torch.no_grad():
                for layer in self._lora_layers():
                    if layer.merged:
                        layer.unmerge()
            self._merged = False

    def unload(self, name: str) -> None:
        """Forget adapter ``name`` (the base model is activated if it was active)."""
        if name not in self._paths:
            raise AdapterError(f"unknown adapter {name!r}; loaded: {self.available or 'none'}")
        if self._active == name:
            self.activate(None)
        others = [n for n in self._paths if n != name]
        if others:  # peft warns when the adapter it tracks as active is deleted
            self._peft.base_model.set_adapter(others[0])
        self._peft.delete_adapter(name)
        del self._paths[name]
        self._apply()

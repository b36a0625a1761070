"""Building, loading and training MBC models from names and command-line options: what the CLI, the demo, the
examples and the benchmarks share (``mbc_hf.cli`` re-exports these names)."""

import json
import os

from . import embedded

# The vocabulary codebook's defaults (issue: a memory that answers): 48 codes (96 bytes) per document chosen by the
# trained selector and kept in document order, each question reading the 3 documents addressing picks; KV-LoRA on
# every layer of a pretrained LM (`build_model`). Options left None take these.
VOCABULARY_DEFAULTS = {"num_context_tokens": 48, "read_documents": 3, "code_selector": "trained",
                       "code_order": "document"}


def build(base_model: str, encoder: str, **config_kwargs):
    """A fresh MBC model: ``tiny``/``tiny-gpt2`` (random, for smoke tests) or pretrained parts (see embedded).
    ``None`` config values are left at their defaults (`VOCABULARY_DEFAULTS` with ``codebook_type="vocabulary"``)."""
    if config_kwargs.get("codebook_type") == "vocabulary":
        config_kwargs = {**VOCABULARY_DEFAULTS, **{k: v for k, v in config_kwargs.items() if v is not None}}
    config_kwargs = {k: v for k, v in config_kwargs.items() if v is not None}
    if base_model.startswith("tiny"):
        from .testing import tiny_mbc_model

        return tiny_mbc_model(base="gpt2" if base_model == "tiny-gpt2" else "llama",
                              encoder="t5" if encoder == "tiny-t5" else "bert", **config_kwargs)
    return build_model(base_model, encoder, **config_kwargs)


# what a damaged or hand-edited model folder raises while it loads (and SafetensorError)
_DAMAGED_FOLDER_ERRORS = (ValueError, OSError, OverflowError, TypeError, KeyError, IndexError, AttributeError,
                          RuntimeError)


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def looks_local(path: str) -> bool:
    """Whether a ``--model`` value names a local path, never to be looked up on the Hub. A Hub model id reads
    ``owner/name`` (MBC models have no owner-less canonical ids); anything else is local: an absolute path, one
    starting with ``.`` or ``~``, a name without ``/`` or with more than one. ``owner/name`` is local too when it
    exists, when its first part is a local folder (``runs/mbc`` with ``runs/`` here) or when ``HF_HUB_OFFLINE`` is
    set."""
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") != 1 or os.sep != "/" and os.sep in path:
        return True
    if os.path.exists(path) or os.path.isdir(path.split("/", 1)[0]):
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def describe_folder(folder: str, limit: int = 8) -> str:
    """What a folder that should hold a saved model holds and misses, in one phrase for an error message."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        return f"cannot list this folder ({_one_line(exc, 200)})"
    missing = [n for n in ("config.json", "model.safetensors") if n not in names]
    checkpoints = sorted((n for n in names if n.startswith("checkpoint-") and n[11:].isdigit()),
                         key=lambda n: int(n[11:]))
    if not names:
        text = "the folder is empty (an interrupted `mbc-hf train` writes its model only at the end)"
    else:
        shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
        text = f"the folder holds {shown} but no {' and no '.join(missing)}"
    if checkpoints:
        text += f"; its last checkpoint is a model folder: --model {os.path.join(folder, checkpoints[-1])}"
    return text


def _check_model_folder(folder: str) -> None:
    """A local model folder must hold a config.json of an MBC model (``model_type: "mbc"``): the command line loads
    it with this package's classes and never runs code shipped in the folder."""
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"--model {folder}: {describe_folder(folder)}; pass a folder written by "
                                "`mbc-hf train` / save_pretrained (config.json + model.safetensors).")
    try:
        with open(config, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (ValueError, AttributeError, RecursionError) as exc:
        raise ValueError(f"--model {folder}: config.json is not a JSON object ({_one_line(exc, 200)}); the folder "
                         "is damaged: restore config.json from where the model was saved, or save the model "
                         "again.") from None
    if model_type != "mbc":
        raise ValueError(f"--model {folder}: config.json names model_type {model_type!r}, not 'mbc', so it is not "
                         "an MBC model folder (or its config was edited). mbc-hf loads MBC folders with its own "
                         "classes and never runs code shipped in a folder (trust_remote_code=False): set "
                         "\"model_type\": \"mbc\" in config.json, or save the model again with save_pretrained.")


def check_model_path(path: str) -> str:
    """The local folder of ``--model`` (``path`` itself for a Hub id), checked before anything is loaded.

    Raises:
        FileNotFoundError / ValueError: as `load_model`, for a missing or wrong local folder."""
    folder = os.path.expanduser(path)
    if looks_local(path) and not os.path.exists(folder):
        raise FileNotFoundError(f"--model {path}: no such folder; pass a folder written by `mbc-hf train` "
                                "(config.json + model.safetensors) or a Hub repo id (owner/name)")
    if os.path.isfile(folder):
        raise FileNotFoundError(f"--model {path}: a file, not a folder; pass the folder written by `mbc-hf train` "
                                "(config.json + model.safetensors)")
    if os.path.isdir(folder):
        _check_model_folder(folder)
    return folder


def load_model(path: str, **config):
    """A saved MBC model (a folder written by ``mbc-hf train`` / ``save_pretrained``, or a Hub repo id) in eval mode,
    loaded with this package's classes (``trust_remote_code=False``: code shipped in the folder is never run);
    ``config`` overrides fields of its `MBCConfig` (e.g. ``addressing_key="minilm-binary"``).

    Raises:
        FileNotFoundError: ``path`` is a local path (`looks_local`: anything but an ``owner/name`` Hub id, or an
            ``owner/name`` whose first part is a local folder) that does not exist, or a folder without
            config.json / model.safetensors (the message lists what it holds).
        ValueError: the folder is not an MBC model (``model_type``) or is damaged (truncated weights, an edited
            config, the weights of another model...): one line naming the folder and the fix.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from . import register_auto_classes

    register_auto_classes()  # `import mbc_hf` skips it when started as the command line

    folder = check_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, **config)
    except FileNotFoundError:
        raise
    except (SafetensorError, *_DAMAGED_FOLDER_ERRORS) as exc:
        if isinstance(exc, OSError) and not os.path.isdir(folder):
            raise  # a Hub repo id: transformers' message (no such repo, offline...) says what is wrong
        if isinstance(exc, ValueError) and folder in str(exc) and "\n" not in str(exc):
            raise  # already names the folder and the fix (weights of another model, missing weights file)
        raise ValueError(f"--model {path}: cannot load this model folder ({type(exc).__name__}: {_one_line(exc)}). "
                         "The folder is damaged or was edited: restore its files from where the model was saved, or "
                         "save the model again with save_pretrained / `mbc-hf train`.") from exc
    return model.eval()


def build_model(base_model: str = "embedded", encoder: str = "embedded", question_encoder: str | None = None,
                **config_kwargs):
    """An MBC model around a pretrained base LM and encoder (local paths, Hub ids, or ``"embedded"``).

    The checkpoint will reference the base LM by ``base_model`` (not store it). The question encoder starts as a
    copy of the document encoder, or as ``question_encoder`` (a path or Hub id) when given. With
    ``codebook_type="vocabulary"`` no encoder is loaded.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .modeling_mbc import MBCModelForCausalLM

    base_path = embedded.resolve(base_model, "base")
    lm = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if config_kwargs.get("codebook_type") == "vocabulary":  # documents and questions are read in LM tokens
        enc = encoder_tokenizer = None
        if config_kwargs.get("kv_lora_layers") is None:  # the LM reads the codes as tokens: adapt every layer's K/V
            config_kwargs["kv_lora_layers"] = lm.config.num_hidden_layers
    else:
        encoder_path = embedded.resolve(encoder, "encoder")
        enc = AutoModel.from_pretrained(encoder_path, dtype=torch.float32)
        encoder_tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    q_enc = None if question_encoder is None or enc is None else AutoModel.from_pretrained(
        embedded.resolve(question_encoder, "encoder"), dtype=torch.float32)
    return MBCModelForCausalLM.from_components(lm, enc, tokenizer, encoder_tokenizer, question_encoder=q_enc,
                                               base_model_name_or_path=base_model, **config_kwargs)


LEARNED_ONLY = ("no_vq", "freeze_amortization", "freeze_codebook", "codebook_kmeans_docs", "train_encoders",
                "contrastive_weight", "distillation_weight", "reconstruction_weight", "prefix_mode", "prefix_length",
                "code_entropy_weight", "addressing_codes", "dead_code_steps", "codebook_backend")


def build_from_args(a):
    vocabulary = a.codebook_type == "vocabulary"
    given = [name for name in LEARNED_ONLY if getattr(a, name, None) not in (None, False, 0, 0.0)]
    if vocabulary and given:
        raise ValueError(f"--{given[0].replace('_', '-')} applies to the paper's learned codebook; add "
                         "--codebook-type learned (the default is the vocabulary codebook).")
    reconstruction = a.reconstruction_weight if a.reconstruction_weight is not None else 0.0 if vocabulary else 0.5
    return build(a.base_model, a.encoder, reconstruction_loss_weight=reconstruction, codebook_type=a.codebook_type,
                 read_documents=a.read_documents, code_selector=a.code_selector, code_order=a.code_order,
                 whole_words=a.whole_words or None, reconstruction_length=a.reconstruction_length,
                 num_context_tokens=a.num_context_tokens, kv_lora_layers=a.kv_lora_layers,
                 freeze_encoders=not a.train_encoders,
                 codebook_dim=a.codebook_dim or None, prefix_mode=a.prefix_mode, prefix_length=a.prefix_length,
                 code_entropy_weight=a.code_entropy_weight, dead_code_steps=a.dead_code_steps,
                 codebook_backend=a.codebook_backend,
                 freeze_amortization=a.freeze_amortization or None,
                 contrastive_loss_weight=a.contrastive_weight, contrastive_margin=a.contrastive_margin,
                 distillation_loss_weight=a.distillation_weight, use_vq=False if a.no_vq else None,
                 aggregation=a.aggregation, topk_documents=a.topk_documents, addressing_codes=a.addressing_codes,
                 addressing_key=getattr(a, "addressing_key", None))


def model_from_args(a):
    """The model a `mbc_hf.arguments.ModelArguments` names: the saved one at ``a.model_name_or_path`` (in training
    mode) or a new one (`build_from_args`)."""
    if a.model_name_or_path:
        return load_model(a.model_name_or_path).train()
    return build_from_args(a)


def split_train_eval(dataset, eval_docs: int):
    """Hold out the rows of ``eval_docs`` documents spread evenly over the file (every k-th document in file order)
    for the memory gain: they come from the same articles as the training documents (unseen paragraphs of seen
    topics); the dev set measures unseen topics."""
    doc_ids = list(dict.fromkeys(dataset["doc_id"]))
    step = len(doc_ids) / eval_docs if eval_docs else 0
    held = {doc_ids[int(i * step)] for i in range(eval_docs)} if eval_docs else set()
    train = dataset.filter(lambda r: r["doc_id"] not in held)
    return train, dataset.filter(lambda r: r["doc_id"] in held) if held else None

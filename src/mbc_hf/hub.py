"""Hub-ready MBC folders: the memory bank file, the model card, loading a bank back, and `push_to_hub`.

A folder written by ``MBCModelForCausalLM.save_pretrained(dir, memory_bank=bank)`` holds what a Hub user expects:

======================================  ==============================================================================
file                                    what
======================================  ==============================================================================
``config.json``                         `MBCConfig` with ``auto_map`` (``trust_remote_code=True`` works without mbc-hf)
``model.safetensors``                   MBC modules + KV-LoRA (+ the base LM when it is not referenced)
``kv_lora/adapter_*``                   KV-LoRA as a standard PEFT adapter (``PeftModel.from_pretrained``)
``*.py``                                the modeling code, copied for ``trust_remote_code``
``tokenizer*.json``                     the LM tokenizer; ``encoder_tokenizer/`` the encoder's
``memory_bank.safetensors``             optional: the bank (uint8/uint16 codes + doc ids), `MEMORY_BANK_FILE`
``README.md``                           model card from ``model_card_template.md`` (metrics of the last evaluation,
                                        bank statistics, how to load and use)
``model_card_data.json``                what the card was rendered from (`load_model_card_data`)
======================================  ==============================================================================

`push_to_hub` saves that folder to a temporary directory and uploads it with ``HfApi.create_repo`` +
``HfApi.upload_folder``. `load_memory_bank` gets the bank back from a folder, a file or a Hub repo.

This file is copied next to checkpoints for ``trust_remote_code`` loading: it may only import the standard
library, torch, safetensors, huggingface_hub and sibling modules.
"""

import json
import os
import tempfile
import warnings
from pathlib import Path

from .atomic import write_text_atomic
from .memory_bank import MEMORY_BANK_FILE, DenseMemoryBank, load_bank
from .model_card import bank_markdown, bank_statistics, render_model_card

#: File name of the model card.
MODEL_CARD_FILE = "README.md"
#: What the card was rendered from (metrics, training data, licence...), so a re-save / push after loading can
#: render the same card: see `load_model_card_data`.
MODEL_CARD_DATA_FILE = "model_card_data.json"
_CARD_DATA_KEYS = ("metrics", "training_note", "license", "training_data", "datasets", "tags")


# ---------------------------------------------------------------------------------------------------- files
def check_bank_for_model(memory_bank, model) -> None:
    """Raise if ``memory_bank`` cannot be read by ``model``.

    Raises:
        TypeError: not a `CompressedMemoryBank` / `DenseMemoryBank`.
        ValueError: a compressed bank from another codebook (fingerprint), or another T / K / d.
    """
    model.reader.check_bank(memory_bank)
    if isinstance(memory_bank, DenseMemoryBank):
        d = model.config.text_config.get_text_config().hidden_size
        if memory_bank.num_tokens != model.config.num_context_tokens or memory_bank.hidden_size != d:
            raise ValueError(f"dense bank has T={memory_bank.num_tokens}, d={memory_bank.hidden_size}; this model has "
                             f"T={model.config.num_context_tokens}, d={d}.")


def save_memory_bank(memory_bank, save_directory, model=None) -> str:
    """Write ``memory_bank`` to ``save_directory/memory_bank.safetensors`` (atomically, see
    `CompressedMemoryBank.save`).

    Args:
        memory_bank: a `CompressedMemoryBank` or `DenseMemoryBank`.
        save_directory: an existing folder.
        model: when given, the bank is checked against it first (`check_bank_for_model`).

    Returns:
        The path written.
    """
    if model is not None:
        check_bank_for_model(memory_bank, model)
    path = os.path.join(os.fspath(save_directory), MEMORY_BANK_FILE)
    memory_bank.save(path)
    return path


def load_memory_bank(path_or_repo_id, model=None, filename: str = MEMORY_BANK_FILE, revision: str | None = None,
                     token: str | bool | None = None, cache_dir=None, local_files_only: bool = False,
                     subfolder: str = ""):
    """Load the memory bank shipped with a saved MBC model.

    Args:
        path_or_repo_id: a ``.safetensors`` bank file, a folder written by ``save_pretrained(dir, memory_bank=...)``
            (reads ``dir/memory_bank.safetensors``), or a Hub repo id (downloads ``filename`` with
            ``hf_hub_download``; ``revision`` / ``token`` / ``cache_dir`` / ``local_files_only`` / ``subfolder`` are
            passed on).
        model: an `MBCModelForCausalLM`; when given the bank is checked against its codebook (fingerprint, T, K).

    Returns:
        `CompressedMemoryBank` (codes ``(N, T)`` uint8/uint16) or `DenseMemoryBank` (vectors ``(N, T, d)``),
        whichever the file holds.

    Raises:
        FileNotFoundError: the folder / repo has no bank file (the model was saved without ``memory_bank=``).
        ValueError: an empty location, a corrupted file, or a bank built with another codebook than ``model``'s.
    """
    path = os.fspath(path_or_repo_id) if path_or_repo_id is not None else ""
    if not path:
        raise ValueError("no bank location: pass a folder, a bank file or a Hub repo id (a model built in memory has "
                         "no name_or_path to load its bank from).")
    if os.path.isdir(path):
        path = os.path.join(path, subfolder, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: {path_or_repo_id} was saved without a memory bank "
                                    "(save_pretrained(dir, memory_bank=bank) writes one).")
    elif not os.path.isfile(path):
        if os.path.isabs(path) or path.startswith((".", "~")):
            raise FileNotFoundError(f"{path} does not exist (neither a bank file nor a saved model folder).")
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = hf_hub_download(path, filename, subfolder=subfolder or None, revision=revision, token=token,
                                   cache_dir=cache_dir, local_files_only=local_files_only)
        except EntryNotFoundError as exc:
            raise FileNotFoundError(f"Hub repo {path_or_repo_id} has no {filename}: it was pushed without a memory "
                                    "bank.") from exc
    bank = load_bank(path)
    if model is not None:
        check_bank_for_model(bank, model)
    return bank


# ---------------------------------------------------------------------------------------------------- card
def write_model_card(model, save_directory, memory_bank=None, **card_kwargs) -> str:
    """Render the model card (`mbc_hf.model_card.render_model_card`) of ``model`` and write it atomically to
    ``save_directory/README.md``, and what it was rendered from to ``model_card_data.json``. ``memory_bank``: the
    bank stored in the folder, described in the card. ``card_kwargs``: other `render_model_card` arguments
    (``model_id``, ``training_data``, ``license``, ...); ``metrics`` defaults to ``model.eval_metrics`` (set by
    `MBCTrainer.evaluate`). Returns the path of the card."""

    if card_kwargs.get("metrics") is None:
        card_kwargs["metrics"] = getattr(model, "eval_metrics", None)
    card = render_model_card(model, memory_bank=memory_bank, **card_kwargs)
    directory = os.fspath(save_directory)
    data = {k: card_kwargs[k] for k in _CARD_DATA_KEYS if card_kwargs.get(k) is not None}
    write_text_atomic(os.path.join(directory, MODEL_CARD_DATA_FILE), json.dumps(data, indent=2, sort_keys=True))
    path = os.path.join(directory, MODEL_CARD_FILE)
    write_text_atomic(path, str(card))
    return path


def load_model_card_data(save_directory) -> dict:
    """The `render_model_card` arguments a folder's card was rendered from (``metrics``, ``training_data``,
    ``license``...; ``model_card_data.json``), ``{}`` when the folder has none. Pass them back as
    ``save_pretrained(..., model_card_kwargs=...)`` / ``push_to_hub(..., model_card_kwargs=...)`` to keep the card
    of a loaded model. Raises ``ValueError`` if the file is not a JSON object."""
    path = os.path.join(os.fspath(save_directory), MODEL_CARD_DATA_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return {k: v for k, v in data.items() if k in _CARD_DATA_KEYS}


def save_hub_files(model, save_directory, memory_bank=None, model_card_kwargs: dict | None = None) -> None:
    """The files `MBCModelForCausalLM.save_pretrained` adds for the Hub: ``memory_bank.safetensors`` (when
    ``memory_bank`` is given) and ``README.md``.

    With ``memory_bank=None`` a bank file already in the folder is left alone: the card describes it when it was
    built with this model's codebook; otherwise a `UserWarning` says it is stale (its codes would be refused).

    Raises:
        ValueError / TypeError: ``memory_bank`` does not fit the model (see `check_bank_for_model`).
    """
    save_directory = os.fspath(save_directory)
    if memory_bank is not None:
        save_memory_bank(memory_bank, save_directory, model=model)
    elif os.path.isfile(os.path.join(save_directory, MEMORY_BANK_FILE)):
        try:
            memory_bank = load_memory_bank(save_directory, model=model)
        except ValueError as exc:
            warnings.warn(f"{save_directory}/{MEMORY_BANK_FILE} was left in place from an earlier save but does not "
                          f"fit this model ({exc}); delete it or save again with memory_bank=.", stacklevel=3)
    write_model_card(model, save_directory, memory_bank=memory_bank, **(model_card_kwargs or {}))


# ---------------------------------------------------------------------------------------------------- upload
def push_to_hub(model, repo_id: str, memory_bank=None, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None, token: str | bool | None = None,
                revision: str | None = None, create_pr: bool = False, include_base_model: bool | None = None,
                model_card_kwargs: dict | None = None, endpoint: str | None = None, api=None):
    """Save ``model`` (and ``memory_bank``) with ``save_pretrained`` into a temporary folder and upload that folder
    to the Hub repo ``repo_id`` (created if missing) in one commit.

    Args:
        repo_id: ``"user/name"`` (or ``"name"``: the server picks the namespace).
        memory_bank: optional bank uploaded as ``memory_bank.safetensors`` (checked against the model first).
        commit_message / commit_description: of the commit (default message ``"Upload MBC model"``).
        private: visibility when the repo is created (ignored for an existing repo, as in ``HfApi.create_repo``).
        token: Hub token (default: the locally saved one).
        revision / create_pr: branch to commit to / open a pull request instead.
        include_base_model: see `MBCModelForCausalLM.save_pretrained`.
        model_card_kwargs: `mbc_hf.model_card.render_model_card` arguments; ``model_id`` defaults to the repo id.
        endpoint: Hub address (default: ``HF_ENDPOINT`` or huggingface.co); api: an ``HfApi`` to use instead.

    Returns:
        ``huggingface_hub.CommitInfo`` of the upload.

    Files already on the Hub that this save does not write (e.g. a bank from an earlier push) are not deleted.

    Raises:
        huggingface_hub.errors.HfHubHTTPError (and subclasses): the Hub refused a request (auth, missing repo...).
        ValueError / TypeError: ``memory_bank`` does not fit the model.
    """
    from huggingface_hub import HfApi

    if memory_bank is not None:
        check_bank_for_model(memory_bank, model)  # before creating anything on the Hub
    api = api if api is not None else HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, token=token, exist_ok=True)
    card = {"model_id": repo_url.repo_id, **(model_card_kwargs or {})}
    with tempfile.TemporaryDirectory(prefix="mbc-push-") as folder:
        model.save_pretrained(folder, include_base_model=include_base_model, memory_bank=memory_bank,
                              model_card_kwargs=card)
        return api.upload_folder(repo_id=repo_url.repo_id, folder_path=folder,
                                 commit_message=commit_message or "Upload MBC model",
                                 commit_description=commit_description, token=token, revision=revision,
                                 create_pr=create_pr)


def folder_files(folder) -> dict[str, bytes]:
    """``{relative posix path: bytes}`` of every file under ``folder`` (what `push_to_hub` uploads; hidden
    files and ``__pycache__`` are skipped, as ``upload_folder``'s default ignore patterns do)."""
    root = Path(folder)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            out[rel.as_posix()] = p.read_bytes()
    return out


__all__ = ["MEMORY_BANK_FILE", "MODEL_CARD_DATA_FILE", "MODEL_CARD_FILE", "bank_markdown", "bank_statistics",
           "check_bank_for_model", "folder_files", "load_memory_bank", "load_model_card_data", "push_to_hub",
           "save_hub_files", "save_memory_bank", "write_model_card"]

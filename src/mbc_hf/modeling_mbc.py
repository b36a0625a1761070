"""MBC as a transformers model: `MBCModelForCausalLM` (Katraouras & Rafailidis, arXiv 2601.00756; MAC, Tack et al.
NeurIPS 2024).

Data flow of the paper's memory (`mbc_hf.reader.LearnedReader`; shapes for a batch of B questions, a memory of N
documents, T context vectors, LM width d):

    documents --AmortizationNetwork--> (N, T, d) --VectorQuantizer--> codes (N, T)      = CompressedMemoryBank
    question  --AmortizationNetwork--> latents (B, T, d)
    latents + memory --Aggregator--> modulation (B, T, d) --PrefixGenerator--> L × (key, value) (B, n_kv, P, hd)
    prefix key/values (as a DynamicCache) + question tokens --frozen LM with KV-LoRA--> answer

The memory scheme (``config.codebook_type``) is a reader (`mbc_hf.reader`) built once in ``__init__``; the model
delegates memorize / memory / prefix work to it and composes the rest: bank, addressing, LM with KV-LoRA.
Only KV-LoRA and the MBC modules train; the base LM stays frozen. By default a checkpoint references the base LM
(``config.base_model_name_or_path``) instead of storing its weights, as PEFT adapters do.
"""

import logging
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .addressing import LearnedAddressing
from .aggregator import Memory
from .configuration_mbc import AGGREGATIONS, MBCConfig
from .ids import document_id, lone_surrogate_at
from .kv_lora import KVLoraConfig, KVLoraLayer, apply_kv_lora, save_kv_lora_adapter
from .memory_bank import CompressedMemoryBank, check_doc_ids_and_metadata
from .reader import reader_for, slot_documents

ENCODER_TOKENIZER_DIR = "encoder_tokenizer"
KV_LORA_DIR = "kv_lora"


@dataclass
class MBCOutput(ModelOutput):
    """Output of `MBCModelForCausalLM.forward`.

    Attributes:
        loss: scalar, ``qa_loss + λ·vq_loss (+ w·reconstruction_loss)`` when labels are given (MBC objective).
        logits: (B, L, vocab) float, LM logits over the question/answer tokens (the prefix is not included).
        qa_loss: scalar, mean NLL of the labelled (answer) tokens.
        vq_loss: scalar, codebook + β·commitment loss of the documents encoded in this call (0 when none).
        perplexity: scalar, codebook usage perplexity of those documents (at most their N·T vectors).
        reconstruction_loss: scalar, NLL of each document's first tokens from its own memory (auxiliary, optional).
        contrastive_loss: scalar, the memory-contrastive hinge (``config.contrastive_loss_weight``; optional).
        distillation_loss: scalar, KL from the base LM reading the gold document in context to the LM reading the
            memory (``config.distillation_loss_weight``; optional).
        addressing_loss: scalar, cross-entropy of each question's gold document among the batch's documents under
            learned top-k addressing (``config.aggregation="topk"``, training with context ids).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    qa_loss: torch.Tensor | None = None
    vq_loss: torch.Tensor | None = None
    perplexity: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    distillation_loss: torch.Tensor | None = None
    addressing_loss: torch.Tensor | None = None


def answer_nll_per_row(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL (nats/token) of each row's labelled tokens: logits (B, L, V) float, labels (B, L) int64 with -100 =
    ignored -> (B,) float (next-token shift as in the LM's own loss; a row without labels gives 0)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (B, L-1)
    return nll.sum(1) / (labels != -100).sum(1).clamp(min=1)


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _check_texts(texts, what: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"{what} must be a list of str, got {type(texts).__name__}; wrap a single text as [text].")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{i}] is {type(text).__name__}, not str.")
        if not text.strip():
            raise ValueError(f"{what}[{i}] is empty or whitespace only; drop it before calling.")
        if (at := lone_surrogate_at(text)) is not None:
            raise ValueError(f"{what}[{i}] holds a lone surrogate at character {at}, which is not valid "
                             "Unicode; decode the source with errors='replace' or drop the text.")
    return list(texts)


class MBCPreTrainedModel(PreTrainedModel):
    config: MBCConfig
    base_model_prefix = "mbc"
    supports_gradient_checkpointing = False
    # base LM weights are referenced by config.base_model_name_or_path, not stored (see save_pretrained)
    _keys_to_ignore_on_load_missing = [r"^lm\.(?!.*lora_)"]

    @torch.no_grad()
    def _init_weights(self, module):
        """MBC modules initialise themselves in __init__ (see each module); sub-models use their own init."""


class MBCModelForCausalLM(MBCPreTrainedModel, GenerationMixin):
    """A frozen causal LM that answers questions from a memory of documents through prefix key/values.

    Build one with `MBCModelForCausalLM.from_components` (pretrained LM + encoder), `mbc_hf.testing.tiny_mbc_model`
    (tests), or load a saved one with ``AutoModelForCausalLM.from_pretrained(path)`` after ``import mbc_hf``.
    ``model.tokenizer`` (LM) and ``model.encoder_tokenizer`` are attached by those constructors and saved with
    the model.
    """

    def __init__(self, config: MBCConfig):
        super().__init__(config)
        self.lm = AutoModelForCausalLM.from_config(config.text_config)
        self.reader = reader_for(self)  # the memory scheme, chosen once (mbc_hf.reader): builds its modules here
        if config.kv_lora_layers > 0:
            apply_kv_lora(self.lm, self.kv_lora_config)
            for name, module in self.lm.named_modules():
                if "lora_" in name:  # keep B = 0 and kaiming A: not re-initialised by the LM's _init_weights
                    module._is_hf_initialized = True
        self.freeze_per_config()
        self.tokenizer = None
        self.encoder_tokenizer = None
        self.eval_metrics = None  # last evaluation (set by MBCTrainer.evaluate), shown in the saved model card
        self.post_init()

    def post_init(self):
        super().post_init()
        # transformers only gathers tied weights from direct PreTrainedModel children; the encoder backbones sit one
        # level deeper (T5 ties embed_tokens to shared), so collect them from every sub-model
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    def freeze_per_config(self) -> None:
        """Set ``requires_grad`` from the config: the base LM is frozen except KV-LoRA (MBC §3.3), the encoder
        backbones with ``freeze_encoders``, the whole amortization network with ``freeze_amortization``, the codebook
        when its saved ``frozen`` flag is set. Called on construction and again after `from_pretrained` (loading
        replaces the parameters, and with them their flags)."""
        self.lm.requires_grad_(False)
        for layer in self.lm.modules():
            if isinstance(layer, KVLoraLayer):
                for adapter in layer.active_adapters:
                    layer.lora_A[adapter].requires_grad_(True)
                    layer.lora_B[adapter].requires_grad_(True)
        self.reader.freeze()

    # ------------------------------------------------------------------ construction helpers
    @property
    def uses_vocabulary_codebook(self) -> bool:
        """Whether the codebook is the LM's vocabulary (``config.codebook_type="vocabulary"``)."""
        return self.reader.kind == "vocabulary"

    @property
    def kv_lora_config(self) -> KVLoraConfig:
        c = self.config
        return KVLoraConfig(r=c.kv_lora_r, lora_alpha=c.kv_lora_alpha, lora_dropout=c.kv_lora_dropout,
                            last_n_layers=c.kv_lora_layers, base_model_name_or_path=c.base_model_name_or_path)

    @classmethod
    def from_components(cls, base_model, encoder, tokenizer, encoder_tokenizer, question_encoder=None,
                        base_model_name_or_path: str | None = None, **config_kwargs) -> "MBCModelForCausalLM":
        """Build an MBC model around pretrained parts.

        Args:
            base_model: a causal LM (`PreTrainedModel`); its weights are copied and frozen.
            encoder: document encoder backbone (`PreTrainedModel`, encoder-only or T5-style encoder–decoder); with
                ``codebook_type="vocabulary"`` it is not used and may be None.
            tokenizer / encoder_tokenizer: tokenizers of the LM and of the encoder(s); with
                ``codebook_type="vocabulary"`` documents and questions are read in LM tokens, so the encoder
                tokenizer is the LM's (``encoder_tokenizer`` is ignored).
            question_encoder: question encoder backbone; ``None`` starts it as a copy of ``encoder``.
            base_model_name_or_path: where the base LM can be loaded from again; when given, checkpoints reference
                it instead of storing the LM weights.
            **config_kwargs: other `MBCConfig` fields.
        """
        vocabulary = config_kwargs.get("codebook_type") == "vocabulary"
        config = MBCConfig(text_config=base_model.config.to_dict(),
                           encoder_config=None if vocabulary else encoder.config.to_dict(),
                           question_encoder_config=question_encoder.config.to_dict()
                           if question_encoder and not vocabulary else None,
                           base_model_name_or_path=base_model_name_or_path, **config_kwargs)
        model = cls(config)
        model.load_base_model_weights(base_model.state_dict())
        model.reader.load_encoders(encoder, question_encoder)
        model.tokenizer = tokenizer
        model.encoder_tokenizer = encoder_tokenizer if model.reader.own_encoder_tokenizer else tokenizer
        return model

    def load_base_model_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a plain base-LM state dict into ``self.lm`` (whose K/V projections are wrapped by KV-LoRA).

        Raises:
            ValueError: if a base LM weight of ``self.lm`` is not in ``state_dict``.
        """
        target = self.lm.state_dict()
        mapped = {}
        for key, value in state_dict.items():
            wrapped = re.sub(r"\.(weight|bias)$", r".base_layer.\1", key)
            mapped[key if key in target else wrapped] = value
        result = self.lm.load_state_dict(mapped, strict=False)
        tied = {k.removeprefix("lm.") for k in self.all_tied_weights_keys}
        missing = [k for k in result.missing_keys if "lora_" not in k and k not in tied]
        if missing:
            raise ValueError(f"The base LM state dict lacks {len(missing)} weights, e.g. {missing[:3]}; is it the "
                             f"model named in config.base_model_name_or_path ({self.config.base_model_name_or_path})?")
        self.lm.tie_weights()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then the referenced base LM weights and the saved tokenizers.

        The MBC weights must fit the config exactly: a ``model.safetensors`` that lacks MBC weights the model has,
        holds weights it does not have, or holds them in other shapes (e.g. the weights file of another MBC model
        copied into the folder) is refused instead of leaving those modules randomly initialised.

        Raises:
            ValueError: if the checkpoint neither stores nor references the base LM weights, or its weights do not
                fit its config (missing, unexpected or mismatched MBC weights; the message names the folder).
            FileNotFoundError: a local folder without ``model.safetensors`` (nor its sharded index).
        """
        subfolder = kwargs.get("subfolder", "")
        _check_local_weights(pretrained_model_name_or_path, subfolder)
        referenced = not _checkpoint_has_base_weights(pretrained_model_name_or_path, subfolder)
        wants_info = kwargs.pop("output_loading_info", False)
        with _quiet_about_referenced_base_weights(referenced):
            try:
                model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                      **kwargs)
            except RuntimeError as exc:
                if "ignore_mismatched_sizes" not in str(exc):
                    raise
                raise ValueError(f"{pretrained_model_name_or_path}: model.safetensors does not fit config.json: it "
                                 "holds MBC weights of other shapes (the weights file of another MBC model, or an "
                                 "edited config); put back the model.safetensors saved with this config.json, or "
                                 "save the model again with save_pretrained / `mbc-hf train`.") from None
        _check_loading_info(pretrained_model_name_or_path, info, model,
                            allow_mismatched=bool(kwargs.get("ignore_mismatched_sizes")))
        info = info if wants_info else None
        if referenced:
            ref = model.config.base_model_name_or_path
            if ref is None:
                raise ValueError(f"{pretrained_model_name_or_path} stores no base LM weights and its config names no "
                                 "base_model_name_or_path; save it with save_pretrained(include_base_model=True).")
            model.load_base_model_weights(_load_base_state_dict(ref))
        model.freeze_per_config()
        path = Path(str(pretrained_model_name_or_path))
        if path.is_dir():
            from .hub import load_model_card_data

            try:  # shown again in a re-saved card; a broken card file must not stop loading
                model.eval_metrics = load_model_card_data(path).get("metrics")
            except ValueError as e:
                warnings.warn(f"ignoring the model card data of {path}: {e}", stacklevel=2)
            # config= keeps AutoTokenizer from resolving the folder's auto_map (remote code) again
            if (path / "tokenizer_config.json").exists():
                model.tokenizer = AutoTokenizer.from_pretrained(path, config=model.config.text_config)
            if not model.reader.own_encoder_tokenizer:
                model.encoder_tokenizer = model.tokenizer
            elif (path / ENCODER_TOKENIZER_DIR).is_dir():
                model.encoder_tokenizer = AutoTokenizer.from_pretrained(path / ENCODER_TOKENIZER_DIR,
                                                                        config=model.config.encoder_config)
        return (model, info) if info is not None else model

    def save_pretrained(self, save_directory, include_base_model: bool | None = None, memory_bank=None,
                        model_card_kwargs: dict | None = None, **kwargs):
        """Save config, MBC + KV-LoRA weights (model.safetensors), tokenizers, a standard PEFT export of KV-LoRA
        (``kv_lora/adapter_config.json`` + ``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained``),
        the modeling code (``auto_map``), an optional ``memory_bank.safetensors`` and the model card ``README.md``
        (see `mbc_hf.hub`).

        Args:
            include_base_model: store the frozen base LM weights too (a self-contained checkpoint). Default: only
                when ``config.base_model_name_or_path`` is None, i.e. when there is nothing to reference.
            memory_bank: a bank to ship with the model (`CompressedMemoryBank` / `DenseMemoryBank` of this model);
                its statistics go into the card. Load it back with `load_memory_bank`.
            model_card_kwargs: `mbc_hf.model_card.render_model_card` arguments (``training_data``, ``license``,
                ``model_id``...); the card's metrics are ``self.eval_metrics`` (the last `MBCTrainer.evaluate`).

        Raises:
            ValueError / TypeError: ``memory_bank`` was built with another codebook (checked before writing).
        """
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) would upload the folder before the card and bank are "
                             "written; call model.push_to_hub(repo_id, memory_bank=...) instead.")
        if memory_bank is not None:
            from .hub import check_bank_for_model

            check_bank_for_model(memory_bank, self)
        if include_base_model is None:
            include_base_model = self.config.base_model_name_or_path is None
        state_dict = kwargs.pop("state_dict", None) or self.state_dict()
        if not include_base_model:
            state_dict = {k: v for k, v in state_dict.items() if not (k.startswith("lm.") and "lora_" not in k)}
        super().save_pretrained(save_directory, state_dict=state_dict, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        if self.encoder_tokenizer is not None and self.reader.own_encoder_tokenizer:  # else it is the LM's
            self.encoder_tokenizer.save_pretrained(os.path.join(save_directory, ENCODER_TOKENIZER_DIR))
        if self.config.kv_lora_layers > 0:
            save_kv_lora_adapter(self.lm, self.kv_lora_config, os.path.join(save_directory, KV_LORA_DIR))
        if kwargs.get("is_main_process", True):
            from .hub import save_hub_files

            save_hub_files(self, save_directory, memory_bank=memory_bank, model_card_kwargs=model_card_kwargs)

    def push_to_hub(self, repo_id: str, memory_bank=None, **kwargs):
        """Save this model (and ``memory_bank``) to a temporary folder with `save_pretrained` and upload it to the
        Hub repo ``repo_id`` with ``HfApi.create_repo`` + ``upload_folder``; returns the ``CommitInfo``. Keyword
        arguments (``commit_message``, ``private``, ``token``, ``revision``, ``create_pr``, ``endpoint``, ``api``,
        ``model_card_kwargs``...) and errors: see `mbc_hf.hub.push_to_hub`."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, memory_bank=memory_bank, **kwargs)

    def load_memory_bank(self, path_or_repo_id=None, **kwargs):
        """The bank saved with a model (``memory_bank.safetensors``) from a folder, file or Hub repo (default: where
        this model was loaded from), checked against this model's codebook. Returns a `CompressedMemoryBank` or
        `DenseMemoryBank`; raises ``FileNotFoundError`` when there is none. See `mbc_hf.hub.load_memory_bank`."""
        from .hub import load_memory_bank

        return load_memory_bank(path_or_repo_id or self.name_or_path, model=self, **kwargs)

    # ------------------------------------------------------------------ memory
    def _require_tokenizers(self):
        if self.tokenizer is None or self.encoder_tokenizer is None:
            raise ValueError("This model has no tokenizers attached; set model.tokenizer and model.encoder_tokenizer "
                             "or build it with MBCModelForCausalLM.from_components / from_pretrained.")

    def encode_documents(self, texts: list[str], device=None) -> dict[str, torch.Tensor]:
        """Tokenize documents for the amortization network: ``input_ids``/``attention_mask`` (N, S) int64 on
        ``device`` (default: the model's), truncated to ``config.max_document_length`` tokens (a warning counts
        truncated documents)."""
        enc, n_cut = self._encode_documents(texts, device)
        if n_cut:
            self._warn_truncated(n_cut, len(texts))
        return enc

    def _warn_truncated(self, n_cut: int, n: int, stacklevel: int = 3) -> None:
        warnings.warn(f"{n_cut} of {n} documents exceed max_document_length={self.config.max_document_length} "
                      "encoder tokens and were truncated; split long documents into passages before memorize() to "
                      "keep all of their content.", stacklevel=stacklevel)

    def _encode_documents(self, texts: list[str], device=None) -> tuple[dict[str, torch.Tensor], int]:
        """`encode_documents` without the warning: (the batch, how many documents were truncated). A long text is
        cut to a prefix of at least ``max_document_length`` tokens before tokenizing (16 characters per token,
        grown until the prefix holds enough tokens), so a 5 MB document costs what its first tokens cost."""
        self._require_tokenizers()
        tok, n = self.encoder_tokenizer, self.config.max_document_length
        if n < 1:  # a prefix of 16 * 0 characters would never hold enough tokens
            raise ValueError(f"config.max_document_length must be >= 1, got {n}.")
        heads = []
        for text in texts:
            limit = 16 * n
            while len(text) > limit and len(tok(text[:limit], add_special_tokens=False)["input_ids"]) <= n:
                limit *= 4  # tokens longer than 16 characters: take a longer prefix
            heads.append(text[:limit])
        enc = tok(heads, padding=True, truncation=True, max_length=n, return_overflowing_tokens=True,
                  return_tensors="pt")
        sample = enc["overflow_to_sample_mapping"]  # (rows,): which text each row (window) came from
        first = torch.ones_like(sample, dtype=torch.bool)
        first[1:] = sample[1:] != sample[:-1]
        cut = (torch.bincount(sample, minlength=len(texts)) > 1) | torch.tensor([len(h) < len(t)
                                                                               for h, t in zip(heads, texts)])
        device = device or self.device
        return ({"input_ids": enc["input_ids"][first].to(device),
                 "attention_mask": enc["attention_mask"][first].to(device)}, int(cut.sum()))

    def _warn_long_questions(self, questions: list[str]) -> None:
        """Warn (counted) when questions exceed ``config.max_question_length`` tokens: `encode_questions` keeps
        only their last tokens, for the LM prompt and for the question encoder."""
        n = self.config.max_question_length
        _, n_cut = self._question_prompts(questions)
        if n_cut:
            warnings.warn(f"{n_cut} of {len(questions)} questions exceed max_question_length={n} tokens (with the "
                          "prompt template); only their last tokens are read. Shorten them, or raise "
                          "config.max_question_length.", stacklevel=3)

    def _question_prompts(self, questions: list[str]) -> tuple[list[str], int]:
        """The LM prompts of ``questions`` (``config.prompt_template``) and how many exceed
        ``config.max_question_length`` tokens. Only a prompt's last tokens are read, so a long question is cut to a
        suffix that still gives more than that many tokens before it is tokenized (a 10 MB question costs what its
        last tokens cost; the tokens read are the same)."""
        self._require_tokenizers()
        tok, n, template = self.tokenizer, self.config.max_question_length, self.config.prompt_template
        prompts = [template.format(question=_cut_text(tok, q, n, keep="tail",
                                                      wrap=lambda part: template.format(question=part)))
                   for q in questions]
        n_cut = sum(len(ids) > n for ids in tok(prompts, add_special_tokens=False)["input_ids"]) if prompts else 0
        return prompts, n_cut

    def encode_questions(self, questions: list[str], answers: list[str] | None = None, device=None,
                         contexts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Tokenize questions for both the LM and the question encoder.

        Returns ``input_ids``/``attention_mask`` (B, L) for the LM (prompt from ``config.prompt_template``; left
        padded for generation, or with ``answers``: right padded, `` answer<eos>`` appended and ``labels`` (B, L)
        with -100 everywhere but the answer tokens) and ``question_input_ids``/``question_attention_mask`` (B, S)
        for the question encoder; questions keep their last ``config.max_question_length`` tokens. ``contexts``
        (hybrid reading): one passage per question put before its prompt as ``passage + "\n\n"`` (its first
        ``config.max_document_length`` tokens; "" for none).
        """
        tok, n = self.tokenizer, self.config.max_question_length
        prompts, _ = self._question_prompts(questions)
        prompt_ids = [ids[-n:] for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
        if contexts is not None:
            passages = tok([c + "\n\n" if c else "" for c in contexts], add_special_tokens=False, truncation=True,
                           max_length=self.config.max_document_length)["input_ids"]
            prompt_ids = [c + p for c, p in zip(passages, prompt_ids)]
        bos = _bos(tok)
        if answers is None:
            seqs, labels = [bos + p for p in prompt_ids], None
        else:
            answer_ids = [ids + [tok.eos_token_id] for ids in tok([" " + a for a in answers],
                                                                  add_special_tokens=False)["input_ids"]]
            seqs = [bos + p + a for p, a in zip(prompt_ids, answer_ids)]
            labels = [[-100] * (len(s) - len(a)) + a for s, a in zip(seqs, answer_ids)]
        width = max(len(s) for s in seqs)
        pad = _pad_id(tok)
        left = answers is None  # generation appends on the right, so prompts are left padded
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for i, s in enumerate(seqs):
            fill = width - len(s)
            batch["input_ids"].append([pad] * fill + s if left else s + [pad] * fill)
            batch["attention_mask"].append([0] * fill + [1] * len(s) if left else [1] * len(s) + [0] * fill)
            if labels is not None:
                batch["labels"].append(labels[i] + [-100] * fill)
        device = device or self.device
        out = {k: torch.tensor(v, device=device) for k, v in batch.items() if v}
        enc_tok = self.encoder_tokenizer
        keep = "tail" if getattr(enc_tok, "truncation_side", "right") == "left" else "head"
        q = enc_tok([_cut_text(enc_tok, text, n, keep=keep) for text in self.reader.question_texts(questions)],
                    padding=True, truncation=True, max_length=n, return_tensors="pt")
        out["question_input_ids"] = q["input_ids"].to(device)
        out["question_attention_mask"] = q["attention_mask"].to(device)
        return out

    def encode_in_context(self, documents: list[str], batch: dict[str, torch.Tensor],
                          device=None) -> dict[str, torch.Tensor]:
        """The distillation teacher's input: each question's gold document in the LM's context window, then the
        question batch's own prompt and `` answer<eos>`` tokens (documents keep their first
        ``config.max_document_length`` LM tokens).

        Args:
            documents: B texts, the gold document of each row of ``batch``.
            batch: `encode_questions(questions, answers)` (right padded; its ``input_ids``/``attention_mask`` are
                used, so the teacher sees exactly the student's tokens).

        Returns ``teacher_input_ids``/``teacher_attention_mask`` (B, L') int64, right padded,
        ``teacher_target_mask`` (B, L') bool: the tokens whose prediction is distilled (the prompt without its
        first token, and the answer), and ``target_mask`` (B, L) bool: the same tokens in ``batch`` (see
        `distillation_loss`).

        Raises:
            ValueError: not one document per row of ``batch``."""
        self._require_tokenizers()
        if len(documents) != batch["input_ids"].shape[0]:
            raise ValueError(f"encode_in_context needs one document per question: got {len(documents)} documents "
                             f"for {batch['input_ids'].shape[0]} questions.")
        tok = self.tokenizer
        doc_ids = tok([d + "\n\n" for d in documents], add_special_tokens=False, truncation=True,
                      max_length=self.config.max_document_length)["input_ids"]
        n_bos = len(_bos(tok))
        student_mask = batch["attention_mask"].bool().clone()  # (B, L)
        student_mask[:, :n_bos + 1] = False
        seqs, targets = [], []
        for ids, mask, doc in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), doc_ids):
            ids = ids[:sum(mask)]  # bos + prompt + answer<eos>
            seqs.append(ids[:n_bos] + doc + ids[n_bos:])
            targets.append([False] * (n_bos + len(doc) + 1) + [True] * (len(ids) - n_bos - 1))
        width, pad = max(len(s) for s in seqs), _pad_id(tok)
        device = device or self.device
        return {"teacher_input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device),
                "teacher_attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs],
                                                       device=device),
                "teacher_target_mask": torch.tensor([t + [False] * (width - len(t)) for t in targets], device=device),
                "target_mask": student_mask.to(device)}

    def encode_reconstruction_targets(self, texts: list[str], device=None) -> dict[str, torch.Tensor]:
        """LM tokens of each document's start for the auxiliary reconstruction loss: ``reconstruction_input_ids`` /
        ``reconstruction_attention_mask`` (N, ≤ config.reconstruction_length), right padded."""
        self._require_tokenizers()
        tok = self.tokenizer
        enc = tok(texts, truncation=True, max_length=self.config.reconstruction_length, padding=True,
                  padding_side="right", add_special_tokens=False, return_tensors="pt")
        device = device or self.device
        return {"reconstruction_input_ids": enc["input_ids"].to(device),
                "reconstruction_attention_mask": enc["attention_mask"].to(device)}

    @torch.no_grad()
    def memorize(self, texts: list[str], memory_bank=None, doc_ids: list[str] | None = None,
                 metadata: list[dict] | None = None, batch_size: int = 32, compress: bool | None = None,
                 on_duplicate: str = "skip", show_progress: bool = False):
        """Online adaptation: encode documents into a memory bank (no gradient, codebook untouched).

        Args:
            texts: documents (non-empty str). doc_ids: their ids (default: `document_id` of the text).
            memory_bank: a bank to extend in place; default: a new one.
            metadata: optional JSON-serialisable dict per document (e.g. timestamp, title).
            compress: ``True`` -> `CompressedMemoryBank` of codes; ``False`` -> a `DenseMemoryBank` of float vectors
                (VQ bypassed, MAC-style). Default: the kind of ``memory_bank`` when given, else ``config.use_vq``.
            on_duplicate: "skip" (default), "overwrite" or "fail" for ids already in the bank.

        Returns:
            The bank (one row per unique document).

        Raises:
            TypeError / ValueError: non-str or empty documents, ids/metadata of the wrong length.
            ValueError: ``memory_bank`` was built with another codebook.
        """
        texts = _check_texts(texts, "texts")
        doc_ids = [document_id(t) for t in texts] if doc_ids is None else list(doc_ids)
        if len(doc_ids) != len(texts) or (metadata is not None and len(metadata) != len(texts)):
            raise ValueError(f"got {len(texts)} texts, {len(doc_ids)} doc_ids and "
                             f"{len(metadata) if metadata is not None else 'no'} metadata entries; lengths must match.")
        # everything is checked before the first batch is stored: a call that raises leaves the bank as it was
        _check_batch_size(batch_size)
        check_doc_ids_and_metadata(doc_ids, metadata)
        first: dict[str, int] = {}
        for i, (doc_id, text) in enumerate(zip(doc_ids, texts)):
            j = first.setdefault(doc_id, i)
            if texts[j] != text:
                raise ValueError(f"doc_ids[{i}] = {doc_id!r} repeats doc_ids[{j}] with another text; one id names one "
                                 "document: give the texts distinct ids (or drop one).")
        if compress is None:  # follow the bank being extended, else the model's setting
            compress = self.config.use_vq if memory_bank is None else isinstance(memory_bank, CompressedMemoryBank)
        if memory_bank is None:
            memory_bank = self.new_memory_bank(compress)
        self.reader.check_bank(memory_bank)
        todo = [i for i, doc_id in enumerate(doc_ids) if on_duplicate != "skip" or doc_id not in memory_bank]
        was_training = self.training
        self.eval()
        n_cut = 0
        try:
            from tqdm.auto import tqdm

            for start in tqdm(range(0, len(todo), batch_size), desc="memorize", disable=not show_progress):
                rows = todo[start:start + batch_size]
                enc, cut = self._encode_documents([texts[i] for i in rows])
                n_cut += cut
                memory_bank.extend([doc_ids[i] for i in rows], self.reader.encode_rows(enc, compress).cpu(),
                                   metadata=[metadata[i] for i in rows] if metadata is not None else None,
                                   on_duplicate=on_duplicate,
                                   **self.reader.row_keys(memory_bank, [texts[i] for i in rows]))  # compact keys
        finally:
            self.train(was_training)
        if n_cut:  # once for the whole call, counting every batch
            self._warn_truncated(n_cut, len(todo), stacklevel=4)  # past torch.no_grad's wrapper
        return memory_bank

    def new_memory_bank(self, compress: bool | None = None):
        """An empty `CompressedMemoryBank` for this model's codebook, or a `DenseMemoryBank` with compress=False
        (default: ``config.use_vq``).

        Raises:
            ValueError: a compressed bank asked of a model trained with the VQ bypassed (its codebook is untrained).
        """
        return self.reader.new_memory_bank(self.config.use_vq if compress is None else compress)

    def memory_from_bank(self, memory_bank, aggregation: str | None = None) -> Memory:
        """The aggregator's view of a bank (see `Memory`). ``aggregation``: "histogram" (exact O(K), compressed banks
        only; the default from config), "dense" (every stored vector, O(N·T)) or "topk" (learned addressing). ``None``
        bank -> empty memory. With a vocabulary codebook the memory is the bank's codes (`token_memory`) with its
        addressing index, and ``aggregation`` does not apply (each question reads whole documents, `read_documents`).

        Raises:
            ValueError: unknown aggregation, histogram asked for a dense bank, or a bank from another codebook.
        """
        if aggregation is not None and aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}.")
        return self.reader.memory_from_bank(memory_bank, aggregation)

    def memory_from_documents(self, context_input_ids, context_attention_mask, question_doc_index=None):
        """Training memory (MBC §3.4): the batch's own documents, quantized with straight-through gradients.

        Args:
            context_input_ids / context_attention_mask: (N, S) encoder tokens of the batch's documents.
            question_doc_index: (B,) int64, the document of each question; when given each question sees only its
                own document (gold-only memory, a curriculum stage); otherwise every question sees all N documents
                (the others act as distractors, as in the reference).

        Returns:
            (Memory of N·T vectors, vq_loss scalar, perplexity scalar); with a vocabulary codebook (`token_memory` of
            the documents' codes, None, None).
        """
        return self.reader.memory_from_documents(context_input_ids, context_attention_mask, question_doc_index)

    def token_memory(self, codes: torch.Tensor, mask: torch.Tensor | None = None) -> Memory:
        """Vocabulary codebook: (N, T) int64 codes (+ an optional (B, N·T) bool mask) -> `Memory` with ``codes``
        (1, N·T) and zero-width ``vectors`` (1, N·T, 0): `token_prefix` reads the codes as LM tokens, so no
        (N·T, d) tensor of the bank's vectors is ever built."""
        return self.reader.token_memory(codes, mask)

    def reconstruction_loss(self, memory: Memory, input_ids, attention_mask) -> torch.Tensor:
        """Auxiliary loss: NLL of each document's tokens (N, R) given only that document's T memory vectors, read
        through the aggregator by ``reconstruction_query`` latents (see ``config.reconstruction_loss_weight``)."""
        return self.reader.reconstruction_loss(memory, input_ids, attention_mask)

    # ------------------------------------------------------------------ prefix
    def prefix_key_values(self, question_input_ids, question_attention_mask, memory: Memory,
                          return_address_scores: bool = False, documents: torch.Tensor | None = None):
        """Question encoder + aggregator + prefix generator -> L × (key, value), each (B, n_kv, P, head_dim); with a
        vocabulary codebook, `token_prefix` (P = 1 + k·T). With learned top-k addressing (``memory.keys``) the
        aggregator reads only each question's ``config.topk_documents`` best documents (`LearnedAddressing`);
        ``return_address_scores`` also returns their (B, N) scores (None without it), for the addressing loss.
        ``documents``: (B, k) int64, the documents a vocabulary codebook reads when addressing was already done
        (`read_documents`; `answer` reuses it for the sources)."""
        if question_input_ids is None:
            raise ValueError("question_input_ids (the question in the encoder's tokenizer) is required; "
                             "build the batch with model.encode_questions(questions).")
        prefix, scores = self.reader.prefix_key_values(question_input_ids, question_attention_mask, memory, documents)
        return (prefix, scores) if return_address_scores else prefix

    def read_documents(self, question_input_ids, question_attention_mask, memory: Memory,
                       k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocabulary codebook: addressing (`mbc_hf.addressing`), the ``k`` documents (default
        ``config.read_documents``; fewer when the memory, or a question's ``memory.mask``, holds fewer) each question
        reads, ranked by the summed IDF of its tokens among their codes (ties: the earlier document). Through the
        bank's `BankIndex` when the memory has one, else by brute force; both give the same ranking.

        Args:
            question_input_ids / question_attention_mask: (B, S) int64, the questions in LM tokens
                (`encode_questions`).
            memory: a `Memory` with ``codes`` (1, N·T) int64 (`memory_from_bank` / `memory_from_documents`) and an
                optional (B, N·T) bool mask.

        Returns:
            (scores (B, k) float64, document indices (B, k) int64 into the memory), best first.
        """
        return self.reader.read_documents(question_input_ids, question_attention_mask, memory, k)

    def token_prefix(self, question_input_ids, question_attention_mask, memory: Memory,
                     documents: torch.Tensor | None = None):
        """Vocabulary codebook: (B, S) question LM tokens + mask and a `Memory` with ``codes`` -> L × (key, value),
        each (B, n_kv, 1 + k·T, head_dim): the LM's own key/values (with KV-LoRA) of BOS (eos for an LM without one)
        and the codes of the k documents `read_documents` picks for each question, read as input tokens (best
        document first; ``documents`` (B, k) int64 when `read_documents` was already called). An empty memory gives
        BOS alone.

        Raises:
            ValueError: a non-empty memory without ``codes`` (built from vectors)."""
        return self.reader.token_prefix(question_input_ids, question_attention_mask, memory, documents)

    def prefix_from_latents(self, modulation: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B, T, d) modulation -> L × (key, value), each (B, n_kv, P, head_dim) (see ``config.prefix_mode``)."""
        return self.reader.prefix_from_latents(modulation)

    def _prefix_cache(self, prefix, attention_mask, batch: int, expand: int = 1):
        """DynamicCache holding the prefix (repeated `expand` times per row) and the mask extended by P ones."""
        if expand > 1:
            prefix = [(k.repeat_interleave(expand, 0), v.repeat_interleave(expand, 0)) for k, v in prefix]
        cache = DynamicCache(prefix, config=self.lm.config)
        P = prefix[0][0].shape[2]
        ones = torch.ones(batch, P, dtype=attention_mask.dtype, device=attention_mask.device)
        return cache, torch.cat([ones, attention_mask], dim=1)

    def _lm_reading(self, memory: Memory, input_ids, attention_mask, question_input_ids, question_attention_mask,
                    labels=None, return_address_scores: bool = False):
        """The LM's output on (B, L) tokens after the prefix key/values of ``memory`` read for these questions (and
        the addressing scores, see `prefix_key_values`)."""
        prefix, scores = self.prefix_key_values(question_input_ids, question_attention_mask, memory,
                                                return_address_scores=True)
        cache, mask = self._prefix_cache(prefix, attention_mask, input_ids.shape[0])
        out = self.lm(input_ids=input_ids, attention_mask=mask, past_key_values=cache, labels=labels)
        return (out, scores) if return_address_scores else out

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, question_input_ids: torch.LongTensor | None = None,
                question_attention_mask: torch.Tensor | None = None, memory_bank=None,
                context_input_ids: torch.LongTensor | None = None, context_attention_mask: torch.Tensor | None = None,
                question_doc_index: torch.LongTensor | None = None, aggregation: str | None = None,
                memory: Memory | None = None, reconstruction_input_ids: torch.LongTensor | None = None,
                reconstruction_attention_mask: torch.Tensor | None = None,
                contrastive_doc_index: torch.LongTensor | None = None,
                teacher_input_ids: torch.LongTensor | None = None, teacher_attention_mask: torch.Tensor | None = None,
                teacher_target_mask: torch.Tensor | None = None, target_mask: torch.Tensor | None = None,
                **kwargs) -> MBCOutput:
        """One MBC forward.

        Args:
            input_ids / attention_mask: (B, L) LM tokens of prompt (+ answer); labels: (B, L), -100 = ignored.
            question_input_ids / question_attention_mask: (B, S) the question in the encoder's tokenizer.
            memory_bank: a `CompressedMemoryBank`/`DenseMemoryBank` to read (inference), or
            context_input_ids / context_attention_mask: (N, S) documents forming the memory (training), with
            question_doc_index: (B,) optional gold-only assignment (see `memory_from_documents`).
            memory: a precomputed `Memory` (overrides the above). Nothing given -> empty memory.
            aggregation: "histogram" | "dense" for ``memory_bank``.
            reconstruction_input_ids / reconstruction_attention_mask: (N, R) LM tokens of the N context documents
                for the auxiliary reconstruction loss (training, with context ids; see `reconstruction_loss`).
            contrastive_doc_index: (B,) int64, the gold document of each question (training, with context ids): the
                target of the addressing loss with ``aggregation="topk"``; with labels, ``contrastive_loss_weight``
                > 0 and N >= 2 the answers are also scored with a memory that lacks the gold document (the batch's
                other documents; in gold-only mode the next document) for the contrastive hinge (see `MBCConfig`).
            teacher_input_ids / teacher_attention_mask / teacher_target_mask / target_mask: the distillation
                teacher's input and the distilled tokens (from `encode_in_context`; training, with
                ``config.distillation_loss_weight`` > 0; see `distillation_loss`).

        Returns:
            `MBCOutput` with ``loss = qa_loss + vq_loss_weight·vq_loss + reconstruction_loss_weight·
            reconstruction_loss + contrastive_loss_weight·contrastive_loss + distillation_loss_weight·
            distillation_loss`` (terms that were not computed are left out) when labels are given.
        """
        vq_loss = perplexity = None
        if memory is None:
            if context_input_ids is not None:
                memory, vq_loss, perplexity = self.memory_from_documents(context_input_ids, context_attention_mask,
                                                                         question_doc_index)
            else:
                memory = self.memory_from_bank(memory_bank, aggregation)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out, address_scores = self._lm_reading(memory, input_ids, attention_mask, question_input_ids,
                                               question_attention_mask, labels, return_address_scores=True)
        addressing_loss = None
        if address_scores is not None and contrastive_doc_index is not None and context_input_ids is not None:
            addressing_loss = LearnedAddressing.loss(address_scores, contrastive_doc_index)
        rec_loss = None
        if reconstruction_input_ids is not None:
            rec_loss = self.reconstruction_loss(memory, reconstruction_input_ids, reconstruction_attention_mask)
        con_loss = None
        if (contrastive_doc_index is not None and labels is not None and context_input_ids is not None
                and self.config.contrastive_loss_weight > 0 and context_input_ids.shape[0] > 1):
            con_loss = self.contrastive_loss(out.logits, labels, input_ids, attention_mask, question_input_ids,
                                             question_attention_mask, memory, contrastive_doc_index)
        dist_loss = None
        if teacher_input_ids is not None and self.config.distillation_loss_weight > 0:
            dist_loss = self.distillation_loss(out.logits, target_mask, teacher_input_ids, teacher_attention_mask,
                                               teacher_target_mask)
        loss = None
        if labels is not None:
            loss = out.loss
            if vq_loss is not None:
                loss = loss + self.config.vq_loss_weight * vq_loss
            if rec_loss is not None:
                loss = loss + self.config.reconstruction_loss_weight * rec_loss
            if con_loss is not None:
                loss = loss + self.config.contrastive_loss_weight * con_loss
            if dist_loss is not None:
                loss = loss + self.config.distillation_loss_weight * dist_loss
            if addressing_loss is not None:
                loss = loss + self.config.addressing_loss_weight * addressing_loss
        return MBCOutput(loss=loss, logits=out.logits, qa_loss=out.loss, vq_loss=vq_loss, perplexity=perplexity,
                         reconstruction_loss=rec_loss, contrastive_loss=con_loss, distillation_loss=dist_loss,
                         addressing_loss=addressing_loss)

    def distillation_loss(self, logits, target_mask, teacher_input_ids, teacher_attention_mask,
                          teacher_target_mask) -> torch.Tensor:
        """Context distillation (not in the paper; gisting / context distillation, Snell et al. 2022): the mean over
        distilled tokens of KL(teacher ‖ student) of the next-token distributions, where the teacher is the base
        LM (KV-LoRA off, no gradient) reading each question's gold document in its context window and the student
        is the LM reading the memory (``logits``, (B, L, V)). Unlike the QA loss it scores the whole vocabulary at
        every prompt and answer token, and what the teacher predicts differs from document to document, so only
        the memory can lower it (see ``config.distillation_loss_weight``).

        Args:
            logits: (B, L, V) float, the student's logits over the `encode_questions` tokens.
            target_mask: (B, L) bool, the distilled tokens there; teacher_input_ids / teacher_attention_mask:
                (B, L') int64; teacher_target_mask: (B, L') bool: as built by `encode_in_context`.

        Returns:
            scalar float, nats per distilled token.

        Raises:
            ValueError: the two masks select a different number of tokens (the batches do not match).
        """
        if target_mask is None or teacher_target_mask is None:
            raise ValueError("distillation needs target_mask and teacher_target_mask; build them with "
                             "model.encode_in_context(documents, model.encode_questions(questions, answers)).")
        student = logits[:, :-1][target_mask[:, 1:].bool()]  # (M, V): logits at t-1 predict token t
        with torch.no_grad(), self.kv_lora_disabled():
            hidden = self.lm.get_decoder()(input_ids=teacher_input_ids,
                                           attention_mask=teacher_attention_mask).last_hidden_state  # (B, L', d)
            teacher = self.lm.get_output_embeddings()(hidden[:, :-1][teacher_target_mask[:, 1:].bool()])  # (M, V)
        if student.shape != teacher.shape:
            raise ValueError(f"distillation: the student selects {student.shape[0]} tokens and the teacher "
                             f"{teacher.shape[0]}; build the teacher's batch from the question batch given "
                             "(encode_in_context(documents, batch)).")
        return nn.functional.kl_div(student.float().log_softmax(-1), teacher.float().log_softmax(-1),
                                    log_target=True, reduction="batchmean")

    def contrastive_loss(self, gold_logits, labels, input_ids, attention_mask, question_input_ids,
                         question_attention_mask, memory: Memory, gold_index) -> torch.Tensor:
        """Memory-contrastive hinge: mean over questions of ``max(0, margin - (nll_without - nll_with))``, where
        ``nll_with`` is each question's answer NLL (nats/token) from ``gold_logits`` (B, L, V) and ``nll_without``
        is the same answer read from ``memory`` (N·T vectors of N >= 2 documents) minus the gold document
        ``gold_index`` (B,): every other document when ``memory.mask`` is None (the batch as distractors), else the
        next document (gold-only mode). See ``config.contrastive_loss_weight``."""
        n = memory.size // self.config.num_context_tokens
        owner = slot_documents(n, self.config.num_context_tokens, gold_index.device)  # (N·T,)
        if memory.mask is None:
            mask = owner[None, :] != gold_index[:, None]  # (B, N·T)
        else:
            mask = owner[None, :] == ((gold_index + 1) % n)[:, None]
        without = self._lm_reading(replace(memory, mask=mask), input_ids, attention_mask, question_input_ids,
                                   question_attention_mask).logits
        gap = answer_nll_per_row(without, labels) - answer_nll_per_row(gold_logits, labels)  # (B,)
        return torch.relu(self.config.contrastive_margin - gap).mean()

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                 question_input_ids: torch.LongTensor | None = None, question_attention_mask=None, memory_bank=None,
                 aggregation: str | None = None, memory: Memory | None = None, documents: torch.Tensor | None = None,
                 **generate_kwargs):
        """`generate` of the base LM, conditioned on a memory through a fresh prefix cache per call.

        Works for greedy, sampling and beam search (the prefix is repeated for ``num_beams`` /
        ``num_return_sequences``). ``input_ids`` must be left padded (see `encode_questions`). Returns the
        LM's output: (B·num_return_sequences, L + new) token ids, prompt included. ``documents``: see
        `prefix_key_values`.
        """
        if memory is None:
            memory = self.memory_from_bank(memory_bank, aggregation)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        gen_config = generate_kwargs.get("generation_config") or self.lm.generation_config
        beams = generate_kwargs.get("num_beams", gen_config.num_beams) or 1
        expand = beams if beams > 1 else generate_kwargs.get("num_return_sequences",
                                                             gen_config.num_return_sequences) or 1
        prefix = self.prefix_key_values(question_input_ids, question_attention_mask, memory, documents=documents)
        cache, mask = self._prefix_cache(prefix, attention_mask, input_ids.shape[0], expand)
        generate_kwargs.setdefault("pad_token_id", self.lm.generation_config.pad_token_id
                                   if self.lm.generation_config.pad_token_id is not None
                                   else self.lm.generation_config.eos_token_id)
        return self.lm.generate(input_ids=input_ids, attention_mask=mask, past_key_values=cache, **generate_kwargs)

    @torch.no_grad()
    def answer(self, questions: list[str], memory_bank=None, max_new_tokens: int = 16, aggregation: str | None = None,
               batch_size: int = 16, show_progress: bool = False, return_sources: bool = False, text_store=None,
               **generate_kwargs) -> list[str] | list[dict]:
        """Answer questions from a memory bank (greedy by default), one string per question (``[]`` for no
        questions).

        The memory is prepared once for all questions (O(K) with histogram aggregation; a bank's addressing index
        with a vocabulary codebook). The answer is the generated text up to the first newline, stripped. Questions
        run ``batch_size`` at a time (a tqdm progress bar with ``show_progress``).

        Args:
            return_sources: return one dict per question instead: ``{"answer": str, "sources": [doc_id, ...],
                "scores": [float, ...], "grounded": bool, "relevance": float}``, the bank documents read (best
                first) and their addressing scores, whether the answer read any (False for an
                empty bank, or below ``config.relevance_threshold``: then ``sources`` and ``scores`` are empty and the
                answer is the empty memory's), the best document's relevance (`mbc_hf.addressing.relevance`, or the
                key similarity of a learned codebook with ``addressing_key``; 0.0 for an empty bank), plus
                ``"passages"`` (doc ids) with ``text_store``. Needs addressing: a vocabulary codebook, or a learned
                one with ``config.addressing_key`` (and a bank memorized with keys).
            text_store: hybrid reading (MAC's BM25 + memory row; off by default): a `mbc_hf.text_store.TextStore`
                whose BM25 top-1 passage goes in the prompt before the question, on top of the bank's prefix (when
                its score is above 0, i.e. it shares a word with the question; otherwise no passage).

        Abstention: with ``config.relevance_threshold`` set, a question whose relevance is below it reads no
        document: it is answered from the empty memory, with or without ``return_sources``.

        Raises:
            ValueError: a bank built with another codebook, an unknown aggregation, empty questions,
                ``return_sources`` without addressing (a learned codebook without ``addressing_key`` reads the whole
                bank).
        """
        questions = _check_texts(questions, "questions")
        _check_batch_size(batch_size)
        if return_sources:
            self.reader.check_addressing()
        if not questions:  # as memorize([]) stores nothing
            return []
        self._warn_long_questions(questions)
        memory = self.memory_from_bank(memory_bank, aggregation)
        threshold = self.config.relevance_threshold  # (set only for a model that addresses: config checks it)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        generate_kwargs.setdefault("pad_token_id", _pad_id(self.tokenizer))
        was_training = self.training
        self.eval()
        answers, sources = [], []
        try:
            from tqdm.auto import tqdm

            for start in tqdm(range(0, len(questions), batch_size), desc="answer", disable=not show_progress):
                chunk = questions[start:start + batch_size]
                found = None
                if text_store is not None:  # (doc id of) each question's passage, None: none shares a word with it
                    found = text_store.top_passages(chunk)
                batch = self.encode_questions(chunk, contexts=None if found is None else
                                              [text_store.get(d) if d else "" for d in found])
                read = grounded = None
                if memory.size > 0 and (return_sources or threshold is not None):
                    # address once: the sources are the documents the prefix reads
                    read = self.read_documents(batch["question_input_ids"], batch["question_attention_mask"],
                                               memory)
                    grounded = self._grounding(batch, read, threshold, memory)
                if return_sources:
                    sources += self._sources(batch["input_ids"].shape[0], read, memory_bank, found, grounded)
                if grounded is not None and not bool(grounded[1].all()):  # some read the empty memory instead
                    texts = [""] * len(chunk)
                    for rows, mem in ((grounded[1].nonzero().flatten(), memory),
                                      ((~grounded[1]).nonzero().flatten(), self.memory_from_bank(None))):
                        if len(rows):
                            docs = read[1][rows.to(read[1].device)] if mem is memory else None
                            part = self._complete(_rows(batch, rows), mem, docs, max_new_tokens, generate_kwargs)
                            for row, text in zip(rows.tolist(), part):
                                texts[row] = text
                else:
                    texts = self._complete(batch, memory, None if read is None else read[1], max_new_tokens,
                                           generate_kwargs)
                answers += texts
        finally:
            self.train(was_training)
        if return_sources:
            return [{"answer": a, **src} for a, src in zip(answers, sources)]
        return answers

    def _complete(self, batch, memory: Memory, documents, max_new_tokens: int, generate_kwargs: dict) -> list[str]:
        """The answers (first generated line, stripped) of a batch of questions reading ``memory`` (``documents``:
        the (B, k) documents already addressed, or None)."""
        out = self.generate(**batch, memory=memory, max_new_tokens=max_new_tokens, documents=documents,
                            **generate_kwargs)
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [_first_line(t) for t in texts]

    def _grounding(self, batch, read, threshold: float | None, memory: Memory) -> tuple[torch.Tensor, torch.Tensor]:
        """(relevance (B,) float64, grounded (B,) bool) of a batch whose questions were addressed (``read``: the
        (scores, documents) of `read_documents`): grounded where the relevance (the reader's: lexical, or fused with
        the compact key) reaches ``threshold`` (None: all)."""
        rel = self.reader.relevance(batch["question_input_ids"], batch["question_attention_mask"], read[0][:, 0],
                                    memory) if read[0].shape[1] else read[0].new_zeros(read[0].shape[0])
        grounded = torch.ones_like(rel, dtype=torch.bool) if threshold is None else rel >= threshold
        return rel.cpu(), grounded.cpu()

    @staticmethod
    def _sources(n: int, read, memory_bank, found, grounded=None) -> list[dict]:
        """Attribution of a batch of n questions: the bank documents `read_documents` picked (``read``: (scores,
        indices), None for an empty memory) as ids and scores, whether they were read (``grounded``: (relevance,
        grounded) of `_grounding`; no sources where not grounded) and, in hybrid reading, the text store's
        passages."""
        out = [{"sources": [], "scores": [], "grounded": False, "relevance": 0.0} for _ in range(n)]
        if read is not None:
            scores, docs = read
            ids = memory_bank.doc_ids
            rel, ok = grounded[0].tolist(), grounded[1].tolist()
            for row, (s, d) in enumerate(zip(scores.tolist(), docs.tolist())):
                out[row] = {"sources": [ids[i] for i in d] if ok[row] else [], "scores": s if ok[row] else [],
                            "grounded": ok[row], "relevance": rel[row]}
        if found is not None:
            for row, passage in enumerate(found):
                out[row]["passages"] = [passage] if passage else []
        return out

    @contextmanager
    def kv_lora_disabled(self):
        """Inside this context the LM runs without KV-LoRA, i.e. as the plain frozen base LM."""
        layers = [m for m in self.lm.modules() if hasattr(m, "enable_adapters") and "lora_A" in m._modules]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    @torch.no_grad()
    def answer_with_base_lm(self, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 16,
                            **generate_kwargs) -> list[str]:
        """Baselines without memory: the plain base LM (KV-LoRA off, no prefix) completes fully formatted prompts
        (closed-book, or with passages in context); returns the first generated line of each, stripped."""
        self._require_tokenizers()
        with self.kv_lora_disabled():
            return complete_prompts(self.lm, self.tokenizer, prompts, max_new_tokens, batch_size, **generate_kwargs)


def _rows(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The given rows of a batch of `encode_questions` (left-padded prompts), without the prompt columns that are
    padding in all of them (so a question answers as it would in a batch of its own kind)."""
    out = {k: v[rows.to(v.device)] for k, v in batch.items()}
    first = int(out["attention_mask"].any(0).nonzero()[0]) if out["attention_mask"].any() else 0
    out["input_ids"], out["attention_mask"] = out["input_ids"][:, first:], out["attention_mask"][:, first:]
    return out


@torch.no_grad()
def complete_prompts(lm, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 16,
                     **generate_kwargs) -> list[str]:
    """Greedy completions of fully formatted ``prompts`` by any causal ``lm`` (left-padded batches of
    ``batch_size``): the first generated line of each, stripped. Raises ValueError for ``batch_size`` < 1."""
    _check_batch_size(batch_size)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", _pad_id(tokenizer))
    answers = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], padding=True, padding_side="left",
                        return_tensors="pt").to(lm.device)
        out = lm.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                          **generate_kwargs)
        answers += [_first_line(t) for t in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                                   skip_special_tokens=True)]
    return answers


def _cut_text(tok, text: str, n: int, keep: str = "head", wrap=None) -> str:
    """``text``, or its prefix (``keep="head"``) / suffix (``"tail"``) that still tokenizes (through ``wrap``, e.g.
    the prompt template) to more than ``n`` + 8 tokens: tokenizing it then keeps the same first / last ``n``
    tokens as tokenizing the whole text, at the cost of those tokens only. Starts at 16 characters per token and
    grows the part 4x while it holds too few tokens."""
    limit = 16 * (n + 8)
    while len(text) > limit:
        part = text[:limit] if keep == "head" else text[-limit:]
        if len(tok(wrap(part) if wrap else part, add_special_tokens=False)["input_ids"]) > n + 8:
            return part
        limit *= 4
    return text


def _bos(tok) -> list[int]:
    """[bos id] when the tokenizer starts sequences with it, else [] (how `encode_questions` starts a prompt)."""
    return [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) else []


def _pad_id(tok) -> int:
    """The tokenizer's pad id, or its eos id when it has none (as generation does)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


@contextmanager
def _quiet_about_referenced_base_weights(active: bool):
    """Drop transformers' "This checkpoint seem corrupted ... tie lm.… to lm.…" warning while loading a checkpoint
    that references its base LM: the tied embeddings are absent on purpose and are loaded right after."""
    if not active:
        yield
        return

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("This checkpoint seem corrupted") and " lm." in message)

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _check_local_weights(name_or_path, subfolder: str = "") -> None:
    """A local model folder must hold its weights file: without this check transformers' error points to a
    huggingface.co URL built from the local path."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    folder = Path(os.fspath(name_or_path)) / subfolder
    if folder.is_dir() and not any((folder / name).is_file() for name in (SAFE_WEIGHTS_NAME,
                                                                          SAFE_WEIGHTS_INDEX_NAME)):
        raise FileNotFoundError(f"{folder} has no {SAFE_WEIGHTS_NAME} (nor {SAFE_WEIGHTS_INDEX_NAME}): the model "
                                "weights are missing from this folder; copy them back from where the model was saved, "
                                "or save the model again with save_pretrained / `mbc-hf train`.")


#: Buffers that only steer training (codebook usage statistics): a checkpoint saved before one of them existed still
#: loads, the buffer keeping its initial value.
_TRAINING_STATE_BUFFERS = re.compile(r"(^|\.)codebook\.(ema_cluster_size|unused_steps)$")


def _check_loading_info(name_or_path, info: dict, model, allow_mismatched: bool = False) -> None:
    """Refuse a checkpoint whose MBC weights do not fit its config (transformers only logs this and initialises the
    missing modules randomly: a bank memorized with them would be random codes). Missing training-only buffers
    (`_TRAINING_STATE_BUFFERS`) are allowed."""
    buffers = {name for name, _ in model.named_buffers()}
    missing = sorted(k for k in info.get("missing_keys") or [] if not (k in buffers and
                                                                       _TRAINING_STATE_BUFFERS.search(k)))
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = [] if allow_mismatched else sorted(k if isinstance(k, str) else k[0]
                                                    for k in info.get("mismatched_keys") or [])
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("with other shapes", mismatched)) if keys]
    raise ValueError(f"{name_or_path}: model.safetensors does not fit config.json: MBC weights {'; '.join(parts)}. "
                     "The weights file belongs to another MBC model (or the config was edited); loading it would "
                     "leave those modules randomly initialised. Put back the model.safetensors saved with this "
                     "config.json, or save the model again with save_pretrained / `mbc-hf train`.")


def _checkpoint_has_base_weights(name_or_path, subfolder: str = "") -> bool:
    """Whether a saved MBC checkpoint stores the base LM's own weights (keys ``lm.*`` other than KV-LoRA)."""
    import json

    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

    try:
        index = cached_file(name_or_path, SAFE_WEIGHTS_INDEX_NAME, subfolder=subfolder)
    except OSError:  # no index: one weights file (whose absence raises below, with transformers' message)
        index = None
    if index is not None:
        with open(index) as f:
            keys = json.load(f)["weight_map"].keys()
    else:
        with safe_open(cached_file(name_or_path, SAFE_WEIGHTS_NAME, subfolder=subfolder), "pt") as f:
            keys = list(f.keys())
    return any(k.startswith("lm.") and "lora_" not in k for k in keys)


def _load_base_state_dict(name_or_path: str) -> dict[str, torch.Tensor]:
    """State dict of the referenced base LM (a local path, a Hub id, or ``"embedded"``)."""
    from .embedded import resolve

    return AutoModelForCausalLM.from_pretrained(resolve(name_or_path, "base"), dtype=torch.float32).state_dict()


__all__ = ["MBCModelForCausalLM", "MBCOutput", "MBCPreTrainedModel", "document_id"]

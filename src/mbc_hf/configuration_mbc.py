"""Configuration of an MBC model (Katraouras & Rafailidis, arXiv 2601.00756, built on MAC, Tack et al. 2024).

Defaults follow the reference code's DistilGPT2 setting (``conf/model/*.yaml`` of Thomkat/MBC) where it is
sensible for a small LM; see ``../shared/docs/method-and-anchors.md`` §1.5 for the table they come from.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

AGGREGATIONS = ("histogram", "dense", "topk")
CODE_SELECTORS = ("idf", "trained")
CODE_ORDERS = ("importance", "document")
CODEBOOK_BACKENDS = ("mbc", "vector-quantize-pytorch")
PREFIX_MODES = ("generator", "soft_tokens")
CODEBOOK_TYPES = ("learned", "vocabulary")
ADDRESSING_KEYS = ("minilm-binary",)  # mbc_hf.compact_key.KEY_KINDS


class MBCConfig(PreTrainedConfig):
    r"""Configuration for [`MBCModelForCausalLM`].

    An MBC model has a frozen causal LM (``text_config``), a document encoder (``encoder_config``, the amortization
    network's backbone: an encoder-only model such as BERT/MiniLM read out by learned queries, or a T5
    encoder-decoder whose decoder reads learned queries), a question encoder (``question_encoder_config``, same kinds;
    ``None`` means a copy of ``encoder_config``), a vector-quantization codebook, an aggregator and a prefix
    generator that feeds per-layer prefix key/values (P-tuning v2) to the LM, plus KV-LoRA on the LM.

    Args:
        text_config (`dict` or `PreTrainedConfig`): config of the frozen base causal LM (default: a Llama config).
        encoder_config (`dict` or `PreTrainedConfig`): config of the document encoder backbone (default: BERT).
        question_encoder_config (`dict` or `PreTrainedConfig`, *optional*): config of the question encoder
            backbone; ``None`` uses ``encoder_config``.
        base_model_name_or_path (`str`, *optional*): where the frozen base LM weights come from. When set, a
            checkpoint references these weights instead of storing them (as PEFT adapters do); when ``None`` the
            base LM weights are saved in the checkpoint. ``"embedded"`` names the packaged SmolLM2-135M-Instruct.
        num_context_tokens (`int`, defaults to 12): T, context vectors per document (MBC §3.1; reference T=12 for
            DistilGPT2, 24 otherwise).
        prefix_length (`int`, defaults to 2): prefix key/values per LM layer (reference ``layer_num_virtual_tokens``).
        codebook_size (`int`, defaults to 512): K, codes in the VQ codebook (MBC §3.2).
        commitment_cost (`float`, defaults to 0.25): β of the commitment loss (VQ-VAE, MBC §3.2).
        vq_loss_weight (`float`, defaults to 1.0): λ in loss = QA loss + λ·(codebook + β·commitment loss).
        ema_decay (`float`, defaults to 0.99): decay of the EMA of code usage (MBC §3.3), logged as the usage
            perplexity.
        dead_code_steps (`int`, defaults to 100): online resetting (MBC §3.3) per step: a code that no vector
            picked in the last N training forwards is dead and is re-seeded from current encoder outputs (the
            reference's EMA rule re-seeds a code ~90-115 optimizer steps after its last use; see `VectorQuantizer`).
        codebook_dim (`int`, *optional*): ``None`` = the paper's codebook of d-dim codes; an int = factorized,
            l2-normalised codes of this size (ViT-VQGAN), which keeps many more codes in use (see `VectorQuantizer`).
        codebook_backend (`str`, defaults to "mbc"): the learned codebook's implementation. "mbc" is the paper's
            (`VectorQuantizer`: L2, codes trained by the codebook loss, straight-through estimator, online
            resetting); "vector-quantize-pytorch" is lucidrains' library (`LibraryVectorQuantizer`: EMA codebook,
            rotation trick, its dead-code replacement on the same window), d-dim codes only.
        code_entropy_weight (`float`, defaults to 0.0): weight of the codebook's entropy loss (spread the batch over
            many codes, each vector sure of its code; LFQ / MAGVIT-v2, not in the paper; see `VectorQuantizer`).
        codebook_type (`str`, defaults to "learned"): "learned" is the paper's VQ codebook of K learned codes
            (`VectorQuantizer`) fed by the amortization network and read through the aggregator. "vocabulary" (not
            in the paper) ties the codebook to the LM's vocabulary (`VocabularyCodebook`): a document's codes are its
            T distinct tokens of highest IDF, K is set to the LM's vocabulary size, and at question time the LM
            (with KV-LoRA) reads the codes of the ``read_documents`` best-matching documents as soft tokens; no
            encoder, aggregator or prefix generator is built. See README, "How it works" and "With the vocabulary
            codebook".
        read_documents (`int`, defaults to 1): with ``codebook_type="vocabulary"`` (or a learned codebook with
            ``addressing_key``), the documents of a bank that each question reads (ranked by `mbc_hf.addressing`,
            or by the compact key).
        addressing_max_postings (`int`, *optional*): with ``codebook_type="vocabulary"``, ``None`` (the default)
            addresses a bank exactly (MaxScore over its inverted index, `mbc_hf.addressing.CodeIndex`); an int L
            reads at most L postings of each question token, so a question's cost stops growing with the bank, at
            the price of sometimes missing a document that only long posting lists would find (approximate;
            ``benchmarks/bank_scale.py --max-postings L`` measures its recall against the exact ranking).
        relevance_threshold (`float`, *optional*): with addressing (``codebook_type="vocabulary"``, or a learned
            codebook with ``addressing_key``: then the relevance is the best document's key similarity), abstention:
            ``None`` (the
            default) always reads the addressed documents; a value in [0, 1] reads no document (the empty memory)
            for a question whose relevance, the best document's addressing score over the question's attainable score
            (`mbc_hf.addressing.relevance`), is below it, and ``answer(..., return_sources=True)`` marks it
            ``"grounded": False``. Calibrated on training data by `mbc_hf.evaluation.calibrate_abstention`
            (``benchmarks/abstention.py``, whose ``--save-to`` writes it into a model folder); the shipped reader
            (`mbc_hf.pretrained`) leaves it off (None); its calibrated value and what it flags are in
            ``benchmarks/README.md`` ("abstention.py").
        addressing_key (`str`, *optional*): with ``codebook_type="vocabulary"``, ``None`` (the default) addresses by
            the codes alone; ``"minilm-binary"`` also stores a 48-byte compact key per document (the sign bits of its
            all-MiniLM-L6-v2 sentence embedding, `mbc_hf.compact_key`), and a question's addressing score becomes
            ``(1 - w) · lexical relevance + w · key similarity`` (w = ``addressing_key_weight``); `memorize` computes
            the keys, `answer` ranks by the fused score, and abstention's relevance is the best document's fused
            score. A bank without keys (built before, or by a model without the key) is still read, lexically.
            With ``codebook_type="learned"`` (not with ``aggregation="topk"``), the key alone addresses a bank of
            codes: each question reads the ``read_documents`` documents of highest key similarity
            (`mbc_hf.compact_key.key_search`), decoded from their codes, instead of the whole bank through the
            aggregator; ``answer(..., return_sources=True)`` then reports them (issue 35: learned codes read after
            compact-key addressing hold 0.8× their gold-only EM from a bank of 1,000, where learned top-k is at
            chance).
        addressing_key_encoder (`str`, defaults to "embedded"): the key's sentence encoder, a local folder or
            ``"embedded"`` (the packaged all-MiniLM-L6-v2); loaded on first use, never downloaded.
        addressing_key_weight (`float`, defaults to 0.7): w above, in [0, 1]; chosen on SQuAD train questions
            (``benchmarks/addressing_key.py --tune``).
        code_selector (`str`, defaults to "idf"): with ``codebook_type="vocabulary"``, how a document's T codes are
            chosen: "idf" (its highest-IDF tokens) or "trained" (a token scorer fitted on the training questions and
            answers; see `VocabularyCodebook`).
        code_order (`str`, defaults to "importance"): with ``codebook_type="vocabulary"``, the order the codes are
            stored and read in: "importance" (best first) or "document" (as they first occur in the document).
        whole_words (`bool`, defaults to False): with ``codebook_type="vocabulary"``, select whole words instead of
            word pieces.
        use_vq (`bool`, defaults to True): ``False`` bypasses the codebook (MAC-style float memory, for ablations).
        aggregator_layers (`int`, defaults to 4): cross-attention blocks of the aggregator (reference: 4).
        aggregator_heads (`int`, defaults to 8) / aggregator_head_dim (`int`, *optional*): attention shape of the
            aggregator; the head dim defaults to ``hidden_size // aggregator_heads`` of the LM.
        prefix_rank (`int`, defaults to 256): bottleneck of the prefix generator (see `PrefixGenerator`).
        prefix_mode (`str`, defaults to "generator"): how the modulation becomes prefix key/values: "generator" (the
            paper's P-tuning v2 expansion, `PrefixGenerator`) or "soft_tokens" (P soft input tokens whose key/values
            the frozen LM computes itself, `SoftTokenPrefix`; not in the paper).
        kv_lora_r / kv_lora_alpha / kv_lora_dropout / kv_lora_layers: KV-LoRA rank, alpha, dropout and number of
            last LM layers adapted (reference: 16 / 32 / 0.05 / 6 for DistilGPT2). ``kv_lora_layers=0`` disables it.
        aggregation (`str`, defaults to "histogram"): default way to read a compressed bank; ``"histogram"`` is the
            exact O(K) form, ``"dense"`` attends over every decoded vector as the reference does.
            ``"topk"`` (learned codebook; CMT's top-k aggregation, not in the paper) builds learned addressing
            (`mbc_hf.addressing.LearnedAddressing`): each question reads only the ``topk_documents`` documents
            whose key, computed from their codes alone, best matches its question key.
        topk_documents (`int`, defaults to 1): k of ``aggregation="topk"``.
        addressing_dim (`int`, defaults to 64): width of the learned addressing keys.
        addressing_codes (`int`, defaults to 0): with ``aggregation="topk"``, a document's key reads only the first
            A of its T codes (0: all T), so the addressing loss shapes those codes and leaves the others to the QA
            loss (the aggregator still reads all T); not in the paper (docs/findings.md).
        addressing_loss_weight (`float`, defaults to 1.0): weight of the addressing loss (cross-entropy of the gold
            document among the batch's documents) with ``aggregation="topk"``.
        max_document_length (`int`, defaults to 256): encoder tokens kept per document (longer ones are truncated
            with a warning by `memorize`).
        max_question_length (`int`, defaults to 128): LM and encoder tokens kept per question (its last tokens).
        prompt_template (`str`): how a question is shown to the LM; must contain ``{question}``.
        freeze_encoders (`bool`, defaults to False): keep the pretrained encoder backbones frozen (the paper trains
            its T5 amortization network fully; freezing makes a CPU step several times cheaper, and only the learned
            queries, readouts and MLPs of the amortization network and question encoder train).
        freeze_amortization (`bool`, defaults to False): keep the whole amortization network (the document side:
            backbone, learned queries, readout, MLP) fixed, so a document's context vectors, and with a frozen
            codebook its codes, never change during training (not in the paper; with ``MBCTrainingArguments``'
            ``codebook_kmeans_docs`` and ``freeze_codebook`` it stops the code collapse seen on CPU runs, README).
        reconstruction_loss_weight (`float`, defaults to 0.0): weight of an auxiliary loss (not in the paper; an
            ICAE-style autoencoding term): from its own memory alone, through a learned query, the LM must predict
            the first ``reconstruction_length`` tokens of each training document. It forces the codes to carry the
            document, which the QA loss alone does not (see README, "Making the memory learnable").
        reconstruction_length (`int`, defaults to 64): LM tokens per document for that loss.
        contrastive_loss_weight (`float`, defaults to 0.0): weight of a memory-contrastive hinge (not in the paper;
            in the spirit of CMT's memory-aware objective): per question, ``max(0, margin - (NLL with a memory
            without its document - NLL with it))``. Its gradient is the *difference* of two QA gradients, so what
            both memories share (the answer format, learned by the QA loss) cancels and what is left is the
            document-specific signal the QA loss alone drowns (README, "Making the memory learnable").
        contrastive_margin (`float`, defaults to 0.5): the margin, in nats per answer token; beyond it the term
            stops pushing (so it cannot run away by ruining answers from the wrong memory).
        distillation_loss_weight (`float`, defaults to 0.0): weight of a context-distillation term (not in the
            paper; gisting / context distillation): KL from the base LM reading the gold document *in context* to
            the LM reading the memory, at every prompt and answer token (`MBCModelForCausalLM.distillation_loss`).

    Example:
        >>> from mbc_hf import MBCConfig
        >>> config = MBCConfig(codebook_size=256, num_context_tokens=8)
        >>> config.text_config.model_type
        'llama'
    """

    model_type = "mbc"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "question_encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True),
    }

    text_config: dict | PreTrainedConfig | None = None
    encoder_config: dict | PreTrainedConfig | None = None
    question_encoder_config: dict | PreTrainedConfig | None = None
    base_model_name_or_path: str | None = None
    num_context_tokens: int = 12
    prefix_length: int = 2
    codebook_size: int = 512
    commitment_cost: float = 0.25
    vq_loss_weight: float = 1.0
    ema_decay: float = 0.99
    dead_code_steps: int = 100
    codebook_dim: int | None = None
    code_entropy_weight: float = 0.0
    codebook_backend: str = "mbc"
    codebook_type: str = "learned"
    read_documents: int = 1
    addressing_max_postings: int | None = None
    relevance_threshold: float | None = None
    addressing_key: str | None = None
    addressing_key_encoder: str = "embedded"
    addressing_key_weight: float = 0.7
    code_selector: str = "idf"
    code_order: str = "importance"
    whole_words: bool = False
    use_vq: bool = True
    aggregator_layers: int = 4
    aggregator_heads: int = 8
    aggregator_head_dim: int | None = None
    prefix_rank: int = 256
    prefix_mode: str = "generator"
    kv_lora_r: int = 16
    kv_lora_alpha: int = 32
    kv_lora_dropout: float = 0.05
    kv_lora_layers: int = 6
    aggregation: str = "histogram"
    topk_documents: int = 1
    addressing_dim: int = 64
    addressing_codes: int = 0
    addressing_loss_weight: float = 1.0
    max_document_length: int = 256
    max_question_length: int = 128
    prompt_template: str = "Question: {question}\nAnswer:"
    freeze_encoders: bool = False
    freeze_amortization: bool = False
    reconstruction_loss_weight: float = 0.0
    reconstruction_length: int = 64
    contrastive_loss_weight: float = 0.0
    contrastive_margin: float = 0.5
    distillation_loss_weight: float = 0.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} is not one of {AGGREGATIONS}.")
        if self.prefix_mode not in PREFIX_MODES:
            raise ValueError(f"prefix_mode={self.prefix_mode!r} is not one of {PREFIX_MODES}.")
        if self.codebook_type not in CODEBOOK_TYPES:
            raise ValueError(f"codebook_type={self.codebook_type!r} is not one of {CODEBOOK_TYPES}.")
        if self.code_selector not in CODE_SELECTORS or self.code_order not in CODE_ORDERS:
            raise ValueError(f"code_selector must be one of {CODE_SELECTORS} and code_order one of {CODE_ORDERS}; got "
                             f"{self.code_selector!r}, {self.code_order!r}.")
        if self.codebook_type == "vocabulary":
            self.codebook_size = self.text_config.get_text_config().vocab_size
            if not self.use_vq or self.reconstruction_loss_weight > 0:
                raise ValueError("codebook_type='vocabulary' stores token ids (lossless, no VQ to bypass) and has no "
                                 "aggregator for the reconstruction loss: keep use_vq=True and "
                                 "reconstruction_loss_weight=0.")
        if self.codebook_backend not in CODEBOOK_BACKENDS:
            raise ValueError(f"codebook_backend must be one of {CODEBOOK_BACKENDS}, got {self.codebook_backend!r}.")
        if self.codebook_backend != "mbc" and (self.codebook_type != "learned" or self.codebook_dim is not None
                                               or self.code_entropy_weight > 0):
            raise ValueError(f"codebook_backend={self.codebook_backend!r} backs the learned codebook of d-dim codes: "
                             "use it with codebook_type='learned', codebook_dim=None and code_entropy_weight=0, or "
                             "keep codebook_backend='mbc'.")
        if not isinstance(self.prompt_template, str) or "{question}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{question}', e.g. 'Question: {question}\\nAnswer:'.")
        try:  # a field other than {question} ("{0}", "{answer}") or a lone brace fails at answer time otherwise
            self.prompt_template.format(question="")
        except (IndexError, KeyError, ValueError) as exc:
            raise ValueError(f"prompt_template={self.prompt_template!r} cannot be filled with a question "
                             f"({type(exc).__name__}: {exc}): its only field may be {{question}}; write a literal "
                             "brace as {{ or }}.") from None
        for name in ("num_context_tokens", "prefix_length", "codebook_size", "aggregator_heads", "prefix_rank",
                     "read_documents", "topk_documents", "addressing_dim", "dead_code_steps", "aggregator_layers",
                     "max_document_length", "max_question_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        if not 0 <= self.addressing_codes <= self.num_context_tokens:
            raise ValueError(f"addressing_codes={self.addressing_codes} must be in [0, num_context_tokens="
                             f"{self.num_context_tokens}]: the key reads the first addressing_codes of a document's "
                             "codes (0: all of them).")
        if self.codebook_size > 65536:
            raise ValueError(f"codebook_size={self.codebook_size} > 65536 does not fit the bank's uint16 codes"
                             + (" (codebook_type='vocabulary' uses the LM's vocabulary size)."
                                if self.codebook_type == "vocabulary" else "."))
        if self.addressing_max_postings is not None and self.addressing_max_postings < 1:
            raise ValueError(f"addressing_max_postings must be None (exact addressing) or >= 1, got "
                             f"{self.addressing_max_postings}.")
        if self.relevance_threshold is not None:
            if isinstance(self.relevance_threshold, bool) or not isinstance(self.relevance_threshold, (int, float)) \
                    or not 0 <= self.relevance_threshold <= 1:
                raise ValueError(f"relevance_threshold must be None (off) or a number in [0, 1], got "
                                 f"{self.relevance_threshold!r}.")
            if self.codebook_type != "vocabulary" and self.addressing_key is None:
                raise ValueError("relevance_threshold needs addressing (codebook_type='vocabulary', or a learned "
                                 "codebook with addressing_key='minilm-binary'): a learned codebook without it reads "
                                 "the whole bank and has no per-question relevance; leave it None.")
            self.relevance_threshold = float(self.relevance_threshold)
        if self.addressing_key is not None:
            if self.addressing_key not in ADDRESSING_KEYS:
                raise ValueError(f"addressing_key={self.addressing_key!r} is not one of {ADDRESSING_KEYS} (or None: "
                                 "lexical addressing alone).")
            if self.aggregation == "topk":
                raise ValueError("addressing_key and aggregation='topk' are two ways to address a bank of learned "
                                 "codes: choose one (aggregation='histogram' with the key, or addressing_key=None "
                                 "with learned top-k).")
        if isinstance(self.addressing_key_weight, bool) or not isinstance(self.addressing_key_weight, (int, float)) \
                or not 0 <= self.addressing_key_weight <= 1:
            raise ValueError(f"addressing_key_weight must be a number in [0, 1] (the key's share of the fused "
                             f"addressing score), got {self.addressing_key_weight!r}.")
        self.addressing_key_weight = float(self.addressing_key_weight)
        if not isinstance(self.addressing_key_encoder, str) or not self.addressing_key_encoder:
            raise ValueError(f"addressing_key_encoder must be 'embedded' or a local folder of a sentence encoder, got "
                             f"{self.addressing_key_encoder!r}.")
        n_layers = self.text_config.get_text_config().num_hidden_layers
        if not 0 <= self.kv_lora_layers <= n_layers:
            raise ValueError(f"kv_lora_layers={self.kv_lora_layers} must be in [0, {n_layers}] for this base LM.")


__all__ = ["MBCConfig"]

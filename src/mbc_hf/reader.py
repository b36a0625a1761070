"""The reader (design.md, part 4): how a memory scheme turns documents into bank rows and a question's memory into
prefix key/values. One class per scheme, chosen once from ``config.codebook_type`` by `reader_for`:

    LearnedReader     the paper's memory (MBC §3): amortization network -> VQ codebook -> codes (N, T); question
                      encoder + aggregator (+ learned top-k or compact-key addressing) + prefix generator -> prefix
                      key/values
    VocabularyReader  codes are LM tokens chosen from the document (`VocabularyCodebook`, not in the paper); lexical
                      addressing picks the documents, whose codes the LM reads as input tokens (its own key/values)

`MBCModelForCausalLM` builds its reader in ``__init__`` and delegates to it; no method of the model asks which scheme
it holds. A reader builds its modules as attributes of the model (``model.codebook``, ``model.aggregator``, ...), so
checkpoints keep their parameter names, and keeps a reference to the model to reach the LM and the config.
"""

import torch
from torch import nn

from .addressing import LearnedAddressing, bank_index, relevance, top_k
from .aggregator import Aggregator, Memory
from .amortization import AmortizationNetwork
from .codebook import VectorQuantizer
from .compact_key import CompactKey, FusedIndex, KeyAddressing
from .memory_bank import CompressedMemoryBank, DenseMemoryBank
from .prefix import PrefixGenerator, SoftTokenPrefix, kv_shape
from .vocabulary_codebook import VocabularyCodebook


def slot_documents(n_docs: int, num_tokens: int, device=None) -> torch.Tensor:
    """(N·T,) int64: the document each memory slot belongs to (slots are stored document-major)."""
    return torch.arange(n_docs, device=device).repeat_interleave(num_tokens)


class Reader:
    """What both schemes share: the checks of a bank of codes and the compact key (``config.addressing_key``,
    `mbc_hf.compact_key`; None when off). Subclasses implement the methods below."""

    kind: str  # the config's codebook_type
    # whether the encoder tokenizer is a tokenizer of its own (saved under encoder_tokenizer/) or the LM's
    own_encoder_tokenizer: bool

    def __init__(self, model):
        self.model = model
        config = model.config
        self.key = CompactKey(config.addressing_key_encoder, config.addressing_key_weight) \
            if config.addressing_key else None

    @property
    def config(self):
        return self.model.config

    def check_compressed_bank(self, bank: CompressedMemoryBank) -> None:
        """Raises ValueError: a bank whose codes mean nothing to this model (another codebook, T or K)."""
        self.check_trained()
        bank.check_codebook(self.model.codebook.fingerprint())
        T, K = self.config.num_context_tokens, self.config.codebook_size
        if bank.num_tokens != T or bank.codebook_size != K:
            raise ValueError(f"bank has T={bank.num_tokens}, K={bank.codebook_size}; this model's codebook has "
                             f"T={T}, K={K}: its codes mean nothing to this model. Fix: re-encode the documents into "
                             "a new bank with this model's memorize() (CLI: mbc-hf adapt --model THIS_MODEL --bank "
                             "NEW_BANK), or load the model the bank was built with.")

    def new_compressed_bank(self) -> CompressedMemoryBank:
        self.check_trained()
        return CompressedMemoryBank(self.config.codebook_size, self.config.num_context_tokens,
                                    self.model.codebook.fingerprint(), **self.key_arguments())

    def check_key(self, bank) -> None:
        """Raises ValueError: a bank whose compact keys come from another key encoder."""
        if self.key is not None:
            self.key.check_bank(bank)

    def key_arguments(self) -> dict:
        """Compact-key arguments of a new bank (`CompressedMemoryBank`'s ``key_bytes``, ``key_fingerprint``): none
        unless the key is on."""
        return self.key.bank_arguments() if self.key is not None else {}

    def row_keys(self, bank, texts: list[str]) -> dict:
        """What `memorize` passes to ``bank.extend`` beside the rows of ``texts``: ``{"keys": (n, W) uint8}`` for a
        bank with compact keys, else nothing (a bank without keys, an old one, stays without).

        Raises:
            ValueError: the bank stores keys but this model has no key encoder (``addressing_key`` None)."""
        if not getattr(bank, "key_bytes", None):
            return {}
        if self.key is None:
            raise ValueError(f"this bank stores a compact key per document ({bank.key_fingerprint}), which this model "
                             "cannot compute (config.addressing_key is None): load the model with "
                             "addressing_key='minilm-binary' (CLI: --addressing-key minilm-binary), or memorize into "
                             "a bank without keys.")
        return {"keys": self.key.document_keys(texts)}

    def question_texts_of(self, question_input_ids, question_attention_mask) -> list[str]:
        """The question texts back from their encoder tokens (`question_texts`, stripped), for the key encoder."""
        tok = self.model.encoder_tokenizer
        return [tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True).strip()
                for ids, mask in zip(question_input_ids.cpu(), question_attention_mask.cpu())]

    def relevance(self, question_input_ids, question_attention_mask, best_scores: torch.Tensor,
                  memory: Memory) -> torch.Tensor:
        """(B,) float64 relevance of each question's best document (abstention), from its addressing score."""
        raise NotImplementedError

    def token_memory(self, codes: torch.Tensor, mask: torch.Tensor | None = None) -> Memory:
        raise ValueError(f"a token memory holds vocabulary codes; this model's codebook is {self.kind!r} "
                         "(build it with codebook_type='vocabulary').")

    def check_addressing(self) -> None:
        """Raises ValueError unless the scheme addresses documents (`read_documents`, for answer attribution)."""

    def read_documents(self, question_input_ids, question_attention_mask, memory: Memory, k=None):
        raise ValueError(f"read_documents is the lexical addressing of vocabulary codes; this model's codebook is "
                         f"{self.kind!r}.")

    def token_prefix(self, question_input_ids, question_attention_mask, memory: Memory, documents=None):
        raise ValueError(f"token_prefix reads vocabulary codes as LM tokens; this model's codebook is {self.kind!r}.")

    def prefix_from_latents(self, modulation: torch.Tensor):
        raise ValueError(f"prefix_from_latents is the prefix generator of a learned codebook; this model's codebook "
                         f"is {self.kind!r}.")

    def reconstruction_loss(self, memory: Memory, input_ids, attention_mask) -> torch.Tensor:
        raise ValueError(f"the reconstruction loss reads memory vectors through the aggregator, which a {self.kind!r} "
                         "codebook does not have: set reconstruction_loss_weight=0.")


class LearnedReader(Reader):
    """The paper's memory: MBC §3.2 (amortization network, VQ codebook with online reset of dead codes), §3.3
    (question encoder, aggregator, per-layer prefix key/values for KV-LoRA), and, not in the paper, one of two ways
    to address a bank: CMT-style learned top-k addressing (``config.aggregation="topk"``), or the compact key
    (``config.addressing_key``: a bank of codes with keys; each question reads the ``config.read_documents``
    documents whose keys are most similar to it, `mbc_hf.compact_key.key_search`). Without either, the aggregator
    reads the whole bank."""

    kind = "learned"
    own_encoder_tokenizer = True

    def __init__(self, model):
        super().__init__(model)
        config = self.config
        d, T = config.text_config.get_text_config().hidden_size, config.num_context_tokens
        model.amortization = AmortizationNetwork(config.encoder_config, T, d)
        model.question_encoder = AmortizationNetwork(config.question_encoder_config or config.encoder_config, T, d)
        if config.codebook_backend == "vector-quantize-pytorch":
            from .codebook_library import LibraryVectorQuantizer

            model.codebook = LibraryVectorQuantizer(config.codebook_size, d, config.commitment_cost,
                                                    config.ema_decay, config.dead_code_steps)
        else:
            model.codebook = VectorQuantizer(config.codebook_size, d, config.commitment_cost, config.ema_decay,
                                             config.dead_code_steps, config.codebook_dim, config.code_entropy_weight)
        head_dim = config.aggregator_head_dim or d // config.aggregator_heads
        model.aggregator = Aggregator(d, config.aggregator_layers, config.aggregator_heads, head_dim)
        num_layers, kv_heads, kv_head_dim = kv_shape(config.text_config)
        if config.prefix_mode == "soft_tokens":
            model.prefix_generator = SoftTokenPrefix(d, T, config.prefix_length,
                                                     model.lm.get_input_embeddings().embedding_dim)
        else:
            model.prefix_generator = PrefixGenerator(d, T, config.prefix_length, config.prefix_rank, num_layers,
                                                     kv_heads, kv_head_dim)
        model.reconstruction_query = nn.Parameter(torch.randn(T, d) * 0.02)  # latents of the auxiliary loss
        # learned top-k addressing (aggregation="topk"); "histogram"/"dense" still read a bank whole
        model.addressing = (LearnedAddressing(d, config.addressing_dim, config.addressing_codes)
                            if config.aggregation == "topk" else None)

    def load_encoders(self, encoder, question_encoder=None) -> None:
        """Copy pretrained encoder weights into the amortization network and the question encoder (default: the
        same encoder), and match a soft-token prefix to the LM's embedding scale."""
        m = self.model
        if isinstance(m.prefix_generator, SoftTokenPrefix):
            m.prefix_generator.match_embedding_scale(m.lm.get_input_embeddings().weight)
        m.amortization.backbone.load_state_dict(encoder.state_dict(), strict=False)
        m.question_encoder.backbone.load_state_dict((question_encoder or encoder).state_dict(), strict=False)

    def freeze(self) -> None:
        m, c = self.model, self.config
        if c.freeze_encoders:
            m.amortization.freeze_backbone()
            m.question_encoder.freeze_backbone()
        if c.freeze_amortization:
            m.amortization.freeze_backbone()
            m.amortization.requires_grad_(False)
        if not m.codebook.frozen.is_meta and bool(m.codebook.frozen):  # (meta while from_pretrained builds)
            m.codebook.freeze()

    def question_texts(self, questions: list[str]) -> list[str]:
        return questions

    def encode_rows(self, enc: dict[str, torch.Tensor], compress: bool) -> torch.Tensor:
        """Encoder tokens of n documents -> codes (n, T) int64, or with ``compress=False`` float vectors (n, T, d)
        in the space the aggregator was trained on (VQ bypassed, MAC-style)."""
        z = self.model.amortization(**enc)  # (n, T, d)
        if compress:
            return self.model.codebook.nearest_codes(z)
        return (self.model.codebook.unquantized(z) if self.config.use_vq else z).float()

    def new_memory_bank(self, compress: bool):
        if compress:
            return self.new_compressed_bank()
        return DenseMemoryBank(self.config.num_context_tokens, self.config.text_config.get_text_config().hidden_size)

    def check_trained(self) -> None:
        if not self.config.use_vq:
            raise ValueError("this model was trained with the VQ bypassed (config.use_vq=False), so its codebook is "
                             "untrained and codes would lose the document: use an uncompressed bank (compress=False; "
                             "CLI: --no-compress).")

    def check_bank(self, bank) -> None:
        if isinstance(bank, CompressedMemoryBank):
            self.check_compressed_bank(bank)
            self.check_key(bank)
        elif not isinstance(bank, DenseMemoryBank):
            raise TypeError("memory_bank must be a CompressedMemoryBank or DenseMemoryBank, "
                            f"got {type(bank).__name__}.")

    def memory_from_bank(self, bank, aggregation: str | None) -> Memory:
        m = self.model
        requested, aggregation = aggregation, aggregation or self.config.aggregation  # (checked by the model)
        d = m.codebook.dim
        if bank is None or len(bank) == 0:
            return Memory(m.codebook.codebook.new_zeros(1, 0, d))
        self.check_bank(bank)
        if requested is None and isinstance(bank, CompressedMemoryBank) and bank.key_bytes and self.key is not None:
            bank.check_codes()  # key addressing: the codes stay codes, only the addressed documents are decoded
            memory = Memory(m.codebook.codebook.new_zeros(1, len(bank) * self.config.num_context_tokens, 0),
                            codes=bank.codes.reshape(1, -1).to(m.device).long())
            memory.index = self.key.addressing(bank)
            return memory
        if aggregation == "topk" and m.addressing is None:
            raise ValueError("aggregation='topk' needs learned addressing, which this model was not built with: "
                             "build and train it with MBCConfig(aggregation='topk') (CLI: --aggregation topk).")
        if isinstance(bank, DenseMemoryBank):
            if requested == "histogram":
                raise ValueError("aggregation='histogram' needs a CompressedMemoryBank; use 'dense' for a dense bank.")
            vectors = bank.vectors.to(m.device, m.codebook.codebook.dtype)  # (N, T, d)
        elif aggregation == "histogram":
            return Memory.from_codebook(m.codebook.codebook, bank.code_counts())
        else:
            bank.check_codes()  # codes >= K (edited in place) would index past the codebook
            vectors = m.codebook.decode(bank.codes.to(m.device).long())  # (N, T, d)
        keys = m.addressing.document_keys(vectors) if aggregation == "topk" else None  # from the codes alone
        return Memory(vectors.reshape(1, -1, d), keys=keys)

    def memory_from_documents(self, context_input_ids, context_attention_mask, question_doc_index=None):
        m = self.model
        z = m.amortization(context_input_ids, context_attention_mask)  # (N, T, d)
        n, T, d = z.shape
        if self.config.use_vq:
            vq = m.codebook(z)
            vectors, vq_loss, perplexity = vq.quantized, vq.loss, vq.perplexity
        else:
            vectors, vq_loss, perplexity = z, z.new_zeros(()), z.new_zeros(())
        mask = None
        if question_doc_index is not None:
            mask = slot_documents(n, T, z.device)[None, :] == question_doc_index[:, None]  # (B, N·T)
        keys = m.addressing.document_keys(vectors) if m.addressing is not None else None  # (N, a)
        return Memory(vectors.reshape(1, n * T, d), mask=mask, keys=keys), vq_loss, perplexity

    def prefix_key_values(self, question_input_ids, question_attention_mask, memory: Memory, documents=None):
        """-> (L × (key, value) each (B, n_kv, P, head_dim), addressing scores (B, N) float or None)."""
        m = self.model
        latents = m.question_encoder(question_input_ids, question_attention_mask)  # (B, T, d)
        scores = None
        if isinstance(memory.index, KeyAddressing):  # compact key: each question reads its k documents' codes
            T, B = self.config.num_context_tokens, question_input_ids.shape[0]
            if documents is None:
                documents = self.read_documents(question_input_ids, question_attention_mask, memory)[1]
            codes = memory.codes.reshape(-1, T)[documents.to(memory.codes.device)]  # (B, k, T)
            memory = Memory(m.codebook.decode(codes).reshape(B, -1, m.codebook.dim))  # (B, k·T, d)
        elif memory.keys is not None:
            B, T, n = latents.shape[0], self.config.num_context_tokens, memory.keys.shape[0]
            scores = m.addressing.scores(latents, memory.keys)  # (B, N)
            allowed = None if memory.mask is None else memory.mask.reshape(B, n, T).any(-1)
            _, vectors = m.addressing.select(memory.vectors.reshape(n, T, -1), scores, self.config.topk_documents,
                                             allowed)
            memory = Memory(vectors)  # (B, k·T, d): each question its own documents
        return self.prefix_from_latents(m.aggregator(latents, memory)), scores

    def prefix_from_latents(self, modulation: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B, T, d) modulation -> L × (key, value), each (B, n_kv, P, head_dim) (see ``config.prefix_mode``)."""
        generator = self.model.prefix_generator
        if isinstance(generator, SoftTokenPrefix):
            return generator(modulation, self.model.lm)
        return generator(modulation)

    def read_documents(self, question_input_ids, question_attention_mask, memory: Memory, k=None):
        """Compact-key addressing: (key similarities (B, k) float64, document indices (B, k) int64), best first,
        k = ``config.read_documents`` by default.

        Raises:
            ValueError: a memory without a key index (the model has no ``addressing_key``, or the bank no keys)."""
        if not isinstance(memory.index, KeyAddressing):
            self.check_addressing()
            raise ValueError("this memory has no compact keys to address by: memorize the documents with this model "
                             "(its config sets addressing_key) into a new bank, whose rows then carry keys.")
        k = min(k or self.config.read_documents, len(memory.index))
        questions = self.key.question_vectors(self.question_texts_of(question_input_ids, question_attention_mask))
        scores, docs = memory.index.search(questions, k)
        return scores, docs.to(question_input_ids.device)

    def relevance(self, question_input_ids, question_attention_mask, best_scores: torch.Tensor,
                  memory: Memory) -> torch.Tensor:
        """The best document's key similarity (in [-1, 1])."""
        return best_scores.double()

    def check_addressing(self) -> None:
        if self.key is not None:
            return  # compact-key addressing reports the documents it reads
        if self.model.addressing is not None:  # aggregation="topk": it addresses, but inside the aggregator
            raise ValueError("return_sources is not supported for learned top-k addressing (aggregation='topk') yet: "
                             "this model does pick topk_documents documents per question, but inside the aggregator, "
                             "which does not report them; call answer() without return_sources, or use "
                             "codebook_type='vocabulary', whose lexical addressing reports its sources.")
        raise ValueError("return_sources needs addressing, which this model does not do (its aggregator reads the "
                         f"whole bank, aggregation={self.config.aggregation!r}): build the model with "
                         "addressing_key='minilm-binary' (compact-key addressing), or use codebook_type='vocabulary'.")

    def reconstruction_loss(self, memory: Memory, input_ids, attention_mask) -> torch.Tensor:
        m = self.model
        n, T = input_ids.shape[0], self.config.num_context_tokens
        owner = slot_documents(n, T, input_ids.device)  # (N·T,)
        own = Memory(memory.vectors, mask=owner[None, :] == torch.arange(n, device=input_ids.device)[:, None])
        latents = m.reconstruction_query[None].expand(n, -1, -1)  # (N, T, d)
        prefix = self.prefix_from_latents(m.aggregator(latents, own))
        cache, mask = m._prefix_cache(prefix, attention_mask, n)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return m.lm(input_ids=input_ids, attention_mask=mask, past_key_values=cache, labels=labels).loss


class VocabularyReader(Reader):
    """Codes are LM tokens (`VocabularyCodebook`): no encoders, no aggregator. Addressing (`mbc_hf.addressing`) picks
    ``config.read_documents`` documents per question and the LM reads their codes as input tokens."""

    kind = "vocabulary"
    own_encoder_tokenizer = False

    def __init__(self, model):
        super().__init__(model)
        config = self.config
        text_config = config.text_config.get_text_config()
        pad_code = text_config.eos_token_id if text_config.eos_token_id is not None else text_config.pad_token_id
        if isinstance(pad_code, list):
            pad_code = pad_code[0]
        model.codebook = VocabularyCodebook(config.codebook_size, config.num_context_tokens, pad_code or 0,
                                            config.code_selector, config.code_order, config.whole_words)
        model.amortization = model.question_encoder = model.aggregator = model.prefix_generator = None
        # lexical addressing over the codes: `read_documents` (mbc_hf.addressing.CodeIndex), fused with the compact key
        # when config.addressing_key is set (self.key)
        model.addressing = None

    def load_encoders(self, encoder, question_encoder=None) -> None:
        pass  # documents and questions are read in LM tokens: no encoder

    def freeze(self) -> None:
        pass  # no encoder here: the LM and KV-LoRA are set by the model

    def question_texts(self, questions: list[str]) -> list[str]:
        # question tokens are matched to document tokens: a leading space tokenizes the first word as it is inside a
        # document (byte-level BPE: "ĠParis", not "Pa", "ris")
        return [" " + q for q in questions]

    def encode_rows(self, enc: dict[str, torch.Tensor], compress: bool) -> torch.Tensor:
        """LM tokens of n documents -> their codes (n, T) int64 (token ids, lossless)."""
        return self.model.codebook.select(**enc)

    def new_memory_bank(self, compress: bool):
        if not compress:
            raise ValueError("a vocabulary codebook stores token ids, which lose nothing: there is no uncompressed "
                             "bank to build; use compress=True (CLI: drop --no-compress).")
        return self.new_compressed_bank()

    def check_trained(self) -> None:
        if not self.model.codebook.fitted:
            raise ValueError("the vocabulary codebook's IDF is not fitted, so every document would get the same "
                             "codes: train the model with MBCTrainer (it fits the IDF on the training documents) or "
                             "call model.codebook.fit(lists of LM token ids of your documents) first.")

    def check_bank(self, bank) -> None:
        if not isinstance(bank, CompressedMemoryBank):
            raise ValueError(f"a vocabulary-codebook model reads banks of token codes (CompressedMemoryBank), got a "
                             f"{type(bank).__name__}; build the bank with this model's memorize().")
        self.check_compressed_bank(bank)
        self.check_key(bank)

    def relevance(self, question_input_ids, question_attention_mask, best_scores: torch.Tensor,
                  memory: Memory) -> torch.Tensor:
        """Lexical: the share of the question's weight found in the best document (`mbc_hf.addressing.relevance`);
        with the key on (a bank with keys), the best document's fused score ``(1 - w) · lexical relevance + w · key
        similarity`` (in [-w, 1])."""
        if isinstance(memory.index, FusedIndex):
            return best_scores.double()
        return relevance(self.model.codebook.question_weights(question_input_ids, question_attention_mask),
                         best_scores)

    def memory_from_bank(self, bank, aggregation: str | None) -> Memory:
        # the question reads whole documents (prefix_key_values): ``aggregation`` does not apply
        if bank is None or len(bank) == 0:
            return self.token_memory(torch.zeros(0, 0, dtype=torch.long, device=self.model.device))
        self.check_bank(bank)
        bank.check_codes()
        memory = self.token_memory(bank.codes.to(self.model.device).long())
        memory.index = bank_index(bank)
        if self.key is not None and bank.key_bytes:  # the key fused with the lexical score (a bank without keys:
            memory.index = self.key.index(bank, memory.index)  # lexical alone, as before keys existed)
        return memory

    def memory_from_documents(self, context_input_ids, context_attention_mask, question_doc_index=None):
        codes = self.model.codebook.select(context_input_ids, context_attention_mask)  # (N, T)
        mask = None
        if question_doc_index is not None:
            mask = slot_documents(*codes.shape, codes.device)[None, :] == question_doc_index[:, None]
        return self.token_memory(codes, mask), None, None  # nothing learned in the codebook: no VQ loss

    def token_memory(self, codes: torch.Tensor, mask: torch.Tensor | None = None) -> Memory:
        codes = codes.reshape(1, -1)  # (1, N·T)
        width = codes.new_zeros(1, codes.shape[1], 0, dtype=torch.float32)  # the reader reads codes, not vectors
        return Memory(width, mask=mask, codes=codes)

    def prefix_key_values(self, question_input_ids, question_attention_mask, memory: Memory, documents=None):
        return self.token_prefix(question_input_ids, question_attention_mask, memory, documents), None

    def read_documents(self, question_input_ids, question_attention_mask, memory: Memory, k=None):
        m, T, B = self.model, self.config.num_context_tokens, question_input_ids.shape[0]
        codes = memory.codes.reshape(memory.codes.shape[0], -1, T)  # (1 or B, N, T)
        n = codes.shape[1]
        k = min(k or self.config.read_documents, n)
        weights = m.codebook.question_weights(question_input_ids, question_attention_mask)  # (B, V)
        if memory.index is not None and memory.mask is None:
            # a FusedIndex (bank with keys, key on) also reads the questions' sentence embeddings
            questions = (self.key.question_vectors(self.question_texts_of(question_input_ids, question_attention_mask)),
                         ) if isinstance(memory.index, FusedIndex) else ()
            scores, docs = memory.index.search(weights, k, self.config.addressing_max_postings, *questions)
            return scores, docs.to(question_input_ids.device)
        scores = m.codebook.score(question_input_ids, question_attention_mask, codes)  # (B, N)
        if memory.mask is not None:
            allowed = memory.mask.reshape(B, n, T).any(-1)  # (B, N)
            scores = scores.masked_fill(~allowed, float("-inf"))
            k = min(k, int(allowed.sum(1).min()))
        return top_k(scores, k)

    def token_prefix(self, question_input_ids, question_attention_mask, memory: Memory, documents=None):
        m, B, T = self.model, question_input_ids.shape[0], self.config.num_context_tokens
        if memory.size > 0 and memory.codes is None:
            raise ValueError("a vocabulary-codebook model reads codes: build the memory with model.memory_from_bank("
                             "bank) or memory_from_documents(...), not from vectors.")
        lm_config = self.config.text_config.get_text_config()
        start = lm_config.bos_token_id if lm_config.bos_token_id is not None else m.codebook.pad_code
        tokens = torch.full((B, 1), start, dtype=torch.long, device=question_input_ids.device)  # (B, 1)
        if memory.size > 0:
            codes = memory.codes.reshape(memory.codes.shape[0], -1, T).expand(B, -1, -1)  # (B, N, T)
            docs = documents if documents is not None else \
                self.read_documents(question_input_ids, question_attention_mask, memory)[1]  # (B, k)
            chosen = codes.gather(1, docs[..., None].expand(-1, -1, T)).reshape(B, -1)  # (B, k·T)
            tokens = torch.cat([tokens, chosen], dim=1)
        cache = m.lm.base_model(input_ids=tokens, use_cache=True).past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]


READERS = {reader.kind: reader for reader in (LearnedReader, VocabularyReader)}


def reader_for(model) -> Reader:
    """The reader of ``model.config.codebook_type``; builds its modules on the model."""
    return READERS[model.config.codebook_type](model)

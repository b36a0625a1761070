"""Tiny, randomly initialised MBC models with locally built tokenizers: no downloads, seconds on a CPU.

    >>> from mbc_hf.testing import tiny_mbc_model
    >>> model = tiny_mbc_model(base="llama", encoder="bert", seed=0).eval()
    >>> bank = model.memorize(["Paris is the capital of France."])
    >>> answers = model.answer(["What is the capital of France?"], memory_bank=bank, max_new_tokens=4)
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import BertConfig, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, T5Config

from .configuration_mbc import MBCConfig
from .modeling_mbc import MBCModelForCausalLM

_CORPUS = [
    "The cat sat on the mat. Paris is the capital of France. Water boils at 100 degrees.",
    "Question: What is the capital of France? Answer: Paris. Who wrote the book? When did it happen?",
    "Document 1 says that item 2 costs 3 euros. Fact 4: the code of room 5 is 678. 9 0",
    "the quick brown fox jumps over the lazy dog while a wise owl reads old news about science and sport",
]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]"]


def tiny_tokenizer(encoder: bool = False, vocab_size: int = 400, corpus: list[str] | None = None
                   ) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on a few sentences, or on ``corpus`` (any text encodes; no
    unknown bytes).

    ``encoder=True`` wraps every text as ``[CLS] … [SEP]`` (BERT style); otherwise it is a causal LM tokenizer
    with ``</s>`` as eos and ``<pad>`` as pad.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or _CORPUS, trainer)
    if encoder:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                     ("[SEP]", tok.token_to_id("[SEP]"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                       cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_lm_config(base: str, vocab_size: int, pad: int, bos: int, eos: int):
    """A 4-layer, width-32 causal LM config: Llama with grouped-query attention (4 heads, 2 KV heads) or GPT-2."""
    ids = dict(pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    if base == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **ids)
    if base == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=4, n_positions=512, **ids)
    raise ValueError(f"base={base!r}: use 'llama' or 'gpt2'.")


def tiny_encoder_config(encoder: str, vocab_size: int, pad: int):
    """A 2-layer, width-32 encoder config: BERT (encoder-only) or T5 (encoder–decoder)."""
    if encoder == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=512, pad_token_id=pad)
    if encoder == "t5":
        return T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                        num_heads=4, pad_token_id=pad, decoder_start_token_id=pad)
    raise ValueError(f"encoder={encoder!r}: use 'bert' or 't5'.")


def tiny_mbc_model(base: str = "llama", encoder: str = "bert", seed: int = 0, corpus: list[str] | None = None,
                   vocab_size: int = 400, **overrides) -> MBCModelForCausalLM:
    """A tiny random MBC model with tokenizers attached, ready for memorize/answer/save_pretrained.

    Args:
        base: "llama" (GQA) or "gpt2" (fused c_attn). encoder: "bert" or "t5".
        seed: torch seed for every random initialisation (same seed -> same weights and codebook).
        corpus / vocab_size: texts the two tokenizers are trained on (default: a few sentences) and their size;
            a corpus of the task's texts keeps its words whole (the synthetic facts' values become single tokens).
        **overrides: `MBCConfig` fields (defaults here: T=4, K=128, 2 aggregator blocks, KV-LoRA r=4 on the last
            2 of 4 layers, prefix rank 16).
    """
    torch.manual_seed(seed)
    tok, enc_tok = tiny_tokenizer(False, vocab_size, corpus), tiny_tokenizer(True, vocab_size, corpus)
    lm_config = tiny_lm_config(base, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    settings = dict(num_context_tokens=4, codebook_size=128, aggregator_layers=2, aggregator_heads=2,
                    prefix_rank=16, kv_lora_r=4, kv_lora_alpha=8, kv_lora_layers=2, max_document_length=64,
                    max_question_length=32)
    settings.update(overrides)
    config = MBCConfig(text_config=lm_config.to_dict(),
                       encoder_config=tiny_encoder_config(encoder, len(enc_tok), enc_tok.pad_token_id).to_dict(),
                       **settings)
    model = MBCModelForCausalLM(config)
    # a vocabulary codebook reads documents and questions in LM tokens
    model.tokenizer, model.encoder_tokenizer = tok, enc_tok if model.reader.own_encoder_tokenizer else tok
    return model


def in_context_texts(model: MBCModelForCausalLM, rows) -> list[str]:
    """Language-modelling texts that teach a tiny LM to read in context (for `pretrain_tiny_lm`): each row's document,
    a newline, the model's prompt for its question, its first answer and EOS. ``rows``: columns ``context``,
    ``question``, ``answers`` (a `datasets.Dataset` or dict of lists)."""
    return [context + "\n" + model.config.prompt_template.format(question=question) + " " + answers[0]
            + model.tokenizer.eos_token
            for context, question, answers in zip(rows["context"], rows["question"], rows["answers"])]


def pretrain_tiny_lm(model: MBCModelForCausalLM, texts: list[str], steps: int = 200, batch_size: int = 32,
                     learning_rate: float = 3e-3, seed: int = 0) -> float:
    """Turn a tiny model's random LM into a small base LM: ``steps`` of full language modelling (Adam) on ``texts``,
    then the LM is frozen again (KV-LoRA untouched). Returns the last loss (nats per token).

    MBC assumes a pretrained LM. A random one cannot stand in for it: with width 32 and ``lm_head`` weights of std
    0.02 every logit stays within about ±0.6, so no answer can get more than a few times the uniform probability,
    whatever the memory says (the tiny synthetic-fact runs stayed at ln(vocabulary size) nats per answer token
    until this was done; docs/findings.md).
    """
    lm, generator = model.lm, torch.Generator().manual_seed(seed)
    params = [p for name, p in lm.named_parameters() if "lora_" not in name]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    loss = torch.tensor(float("nan"))
    try:
        for _ in range(steps):
            pick = torch.randint(len(texts), (batch_size,), generator=generator).tolist()
            batch = model.tokenizer([texts[i] for i in pick], return_tensors="pt", padding=True)
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            loss = lm(**batch, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        for p in params:
            p.requires_grad_(False)
    return float(loss.detach())


def tiny_key_encoder(folder, hidden_size: int = 384, seed: int = 0) -> str:
    """Save a tiny random BERT sentence encoder (1 layer, width ``hidden_size``: 384 gives all-MiniLM-L6-v2's
    48-byte keys) with its tokenizer to ``folder`` and return the folder: a stand-in for the compact key's encoder
    (``MBCConfig(addressing_key="minilm-binary", addressing_key_encoder=folder)``), no download."""
    from transformers import BertModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer(True)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)

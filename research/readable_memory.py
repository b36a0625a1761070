"""What can the frozen base LM read zero-shot from a document-sized memory? Answer NLL (nats per answer token) of the
base LM, untrained, with different memories placed before the question, each for the gold document, for an
unrelated document (the next one in the list) and for no memory at all. It asks whether 12 codes of a 512-entry
codebook, the MBC bank format, hold anything the LM can use before any meta-training, next to what it gets from
the text itself or from 12 of the document's own tokens.

Memories (T = ``--slots`` vectors in the LM's input-embedding space, between BOS and the prompt):

* ``text``: the document's first ``--max-document-tokens`` LM tokens in context (the upper bound);
* ``rare tokens``: the embeddings of the document's T tokens of highest IDF (a selection, not a compression:
  a token id per slot, 16 bits each with this vocabulary);
* ``segment means``: the mean token embedding of each of T equal segments, rescaled to the embeddings' RMS
  (`mbc_hf.amortization.segment_pool`, the amortization network's query start, here in the LM's own space);
* ``segment means, k-means codes``: the same quantized by a 512-code codebook (`VectorQuantizer.kmeans_init` on the
  segment means of the first ``--kmeans-docs`` training documents): what a 12 × 9-bit bank can hold;
* ``codes as typical tokens``: each code read back as the real token most typical of its cluster (highest
  count × IDF over the training segments assigned to it), so that the LM reads real embeddings.

With ``--kv``, memories kept as the LM's own key/values of BOS + the document (every layer; the question's RoPE
positions continue after the document, as in context), not as input embeddings:

* ``key/values, all positions``: the whole KV cache (reads exactly like ``text``; a check of the plumbing);
* ``key/values at the T highest-IDF positions`` / ``at the last T positions``: a query-agnostic KV-cache eviction
  down to BOS + T positions, each a contextual state of the document read so far. Uncompressed and in the LM's own
  format, they show what T memory slots can give this LM without any training.
* ``... highest-IDF positions, k-means codes``: those positions through 512-code k-means codebooks (`KVCodebooks`),
  one per layer, or ``--kv-groups`` per layer (product quantization) with ``--kv-stages`` residual codes each;
  the report adds the relative coding error of the keys and of the values.

IDF comes from `rank_bm25.BM25Okapi` over the training documents' LM tokens.

    python research/readable_memory.py --train ../shared/data/squad/train-part.first44articles.paragraphs.jsonl \
        --data ../shared/data/squad/dev.minus-holdout.paragraphs.jsonl --docs 256 \
        --output benchmarks/results/readable_memory.json
    python research/readable_memory.py ... --docs 256 --kinds --kv --output benchmarks/results/readable_memory_kv.json
    python research/readable_memory.py ... --docs 256 --kv-groups 6 --kv-stages 2 --kinds --kv \
        "key/values at the T highest-IDF positions, k-means codes" \
        --output benchmarks/results/readable_memory_kv_codes_g6s2.json
"""
import argparse
import functools
import sys
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from rank_bm25 import BM25Okapi
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mbc_hf.amortization import segment_pool
from mbc_hf.cli import split_train_eval
from mbc_hf.codebook import VectorQuantizer
from mbc_hf.configuration_mbc import MBCConfig
from mbc_hf.data import documents, load_qa_file
from mbc_hf.demo import batch_mean_table, write_json_report
from mbc_hf.embedded import embedded_base_model_path
from mbc_hf.trainer import article_pair_batches, first_row_per_document, paired_partners


class ReadableMemories:
    """Builds each kind of memory for a document: (n, d_emb) float input embeddings, n = T or the text's length."""

    def __init__(self, tok, embeddings: torch.Tensor, train_docs: list[str], slots: int, max_tokens: int,
                 kmeans_docs: int, codebook_size: int):
        self.tok, self.E, self.T, self.max_tokens = tok, embeddings, slots, max_tokens
        self.rms = embeddings.pow(2).mean().sqrt()
        corpus = [self.ids(d) for d in train_docs]
        self.idf = BM25Okapi([[str(t) for t in ids] for ids in corpus]).idf  # token id (str) -> IDF
        top = max(self.idf.values())
        self.weight = lambda t: self.idf.get(str(t), top)  # unseen in training: as rare as the rarest
        fit = corpus[:kmeans_docs]
        vectors = torch.cat([self.segment_means(ids) for ids in fit])  # (kmeans_docs·T, d_emb)
        self.vq = VectorQuantizer(codebook_size, embeddings.shape[1]).eval()
        self.vq.kmeans_init(vectors)
        # code -> its most typical token: count (in how many of its segments) × IDF
        typical = defaultdict(Counter)
        for ids, codes in zip(fit, self.vq.nearest_codes(vectors.reshape(len(fit), slots, -1))):
            for segment, code in zip(self.segments(ids), codes.tolist()):
                typical[code].update(set(segment))
        self.typical = {c: max(cnt, key=lambda t: cnt[t] * self.weight(t)) for c, cnt in typical.items()}

    def ids(self, doc: str) -> list[int]:
        return self.tok(doc, add_special_tokens=False, truncation=True, max_length=self.max_tokens)["input_ids"]

    def segments(self, ids: list[int]) -> list[list[int]]:
        return [ids[len(ids) * s // self.T: len(ids) * (s + 1) // self.T] for s in range(self.T)]

    def segment_means(self, ids: list[int]) -> torch.Tensor:
        means = segment_pool(self.E[ids][None], torch.ones(1, len(ids)), self.T)[0]  # (T, d_emb)
        return means / means.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6) * self.rms

    def build(self, kind: str, doc: str) -> torch.Tensor:
        ids = self.ids(doc)
        if kind == "text":
            return self.E[ids + self.tok("\n\n", add_special_tokens=False)["input_ids"]]
        if kind == "rare tokens":
            return self.E[sorted(set(ids), key=self.weight, reverse=True)[:self.T]]
        means = self.segment_means(ids)
        if kind == "segment means":
            return means
        codes = self.vq.nearest_codes(means[None])[0]  # (T,) int64: the bank entry
        if kind == "segment means, k-means codes":
            return self.vq.decode(codes)
        return self.E[[self.typical.get(int(c), self.tok.eos_token_id) for c in codes]]  # codes as typical tokens


KINDS = ["text", "rare tokens", "segment means", "segment means, k-means codes", "codes as typical tokens"]
# memories kept as the LM's own key/values (per layer) of BOS + the document, at some positions only
KV_KINDS = ["key/values, all positions", "key/values at the T highest-IDF positions",
            "key/values at the last T positions", "key/values at the T highest-IDF positions, k-means codes"]


def rope(lm, keys: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Apply (or undo) the LM's rotary position embedding: keys (1, kv_heads, n, head_dim) at positions (n,)."""
    cos, sin = lm.model.rotary_emb(keys, positions[None])
    return apply_rotary_pos_emb(keys, keys, cos, -sin if inverse else sin)[1]


class KVCodebooks:
    """Codebooks of ``codebook_size`` codes (k-means, `VectorQuantizer.kmeans_init`) per layer over a kept
    position's (key before RoPE, value) pair, flattened to 2 · kv_heads · head_dim. With ``groups`` G the pair is
    cut into G equal parts, each with its own codebook (product quantization); with ``stages`` S each part's
    residual is coded again S − 1 times (residual quantization). A slot becomes layers · G · S codes (K = 512,
    G = S = 1: 30 codes of 9 bits for SmolLM2, 34 bytes). The fit sees BOS + T rows per training document (the BOS
    rows are alike and take about one code); BOS itself is kept exact in a memory."""

    @torch.no_grad()
    def __init__(self, lm, tok, memories: "ReadableMemories", train_docs: list[str], codebook_size: int,
                 groups: int = 1, stages: int = 1):
        # docs × layers × (1 + T, 2·h·d)
        per_doc = [self.slot_vectors(lm, tok, memories, doc)[0] for doc in train_docs]
        self.groups, self.vqs = groups, []  # layers × groups × stages
        self.squares = torch.zeros(2, 2)  # [keys, values] × [sum of squared coding errors, of squared entries]
        for vectors in zip(*per_doc):  # one layer's vectors of every document
            layer = []
            for part in torch.cat(vectors).chunk(groups, -1):
                stack = []
                for _ in range(stages):
                    vq = VectorQuantizer(codebook_size, part.shape[-1]).eval()
                    vq.kmeans_init(part)
                    part = part - vq.decode(vq.nearest_codes(part))
                    stack.append(vq)
                layer.append(stack)
            self.vqs.append(layer)

    def relative_error(self) -> dict[str, float]:
        """‖coded − exact‖ / ‖exact‖ over every key and every value of the memories built so far (not BOS)."""
        ratio = (self.squares[:, 0] / self.squares[:, 1]).sqrt()
        return {"keys": ratio[0].item(), "values": ratio[1].item()}

    @staticmethod
    def stage_codes(stack: list, x: torch.Tensor) -> list[torch.Tensor]:
        """x (n, c) through a residual stack of codebooks: each stage's (n,) int64 nearest code to what the stages
        before it left over."""
        out, codes = torch.zeros_like(x), []
        for vq in stack:
            codes.append(vq.nearest_codes(x - out))
            out = out + vq.decode(codes[-1])
        return codes

    @classmethod
    def decode(cls, stack: list, x: torch.Tensor) -> torch.Tensor:
        """x (n, c) through a residual stack of codebooks: the sum of each stage's code vector."""
        return sum(vq.decode(c) for vq, c in zip(stack, cls.stage_codes(stack, x)))

    @staticmethod
    def slot_vectors(lm, tok, memories, doc):
        """Per layer (1 + T, 2·kv_heads·head_dim) of BOS + the T highest-IDF positions, keys un-rotated; the
        positions and the question offset."""
        kind = "key/values at the T highest-IDF positions"
        kv, offset = kv_memory(lm, tok, memories, kind, doc)
        positions = kept_positions(memories, kind, _document_cache(lm, tok, memories, doc)[0])
        out = []
        for k, v in kv:
            k = rope(lm, k, positions, inverse=True)
            out.append(torch.cat([k[0].transpose(0, 1).flatten(1), v[0].transpose(0, 1).flatten(1)], -1))
        return out, positions, offset, kv[0][0].shape

    @staticmethod
    def slot_kv(lm, x: torch.Tensor, positions: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's (1 + T, 2·kv_heads·head_dim) rows of `slot_vectors` back to (key, value), each
        (1, kv_heads, 1 + T, head_dim), keys rotated to ``positions``."""
        k, v = x.unflatten(-1, (2, shape[1], shape[3])).permute(1, 2, 0, 3)[:, None]
        return rope(lm, k, positions), v

    @torch.no_grad()
    def memory(self, lm, tok, memories, doc) -> tuple[list, int]:
        """The `kv_memory` of the T highest-IDF positions with every slot replaced by its codes' decoding."""
        vectors, positions, offset, shape = self.slot_vectors(lm, tok, memories, doc)
        kv = []
        for layer, x in zip(self.vqs, vectors):
            parts = x[1:].chunk(self.groups, -1)
            coded = torch.cat([self.decode(stack, part) for stack, part in zip(layer, parts)], -1)
            error = (coded - x[1:]).unflatten(-1, (2, -1)).pow(2).sum((0, 2))  # (2,) keys, values
            self.squares += torch.stack([error, x[1:].unflatten(-1, (2, -1)).pow(2).sum((0, 2))], -1)
            kv.append(self.slot_kv(lm, torch.cat([x[:1], coded]), positions, shape))  # BOS stays exact (the sink)
        return kv, offset


@functools.lru_cache(maxsize=4)  # a document is read as gold and as the previous one's unrelated memory
def _document_cache(lm, tok, memories: "ReadableMemories", doc: str):
    ids = memories.ids(doc) + tok("\n\n", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return ids, lm(input_ids=torch.tensor([[tok.bos_token_id] + ids]), use_cache=True).past_key_values


def kept_positions(memories: "ReadableMemories", kind: str, ids: list[int]) -> torch.Tensor:
    """Cache positions a key/value memory keeps: BOS (0) and document positions (1 + i)."""
    if kind == "key/values, all positions":
        keep = list(range(len(ids)))
    elif kind == "key/values at the last T positions":
        keep = list(range(max(0, len(ids) - memories.T), len(ids)))
    else:  # the T highest-IDF positions
        keep = sorted(sorted(range(len(ids)), key=lambda i: memories.weight(ids[i]), reverse=True)[:memories.T])
    return torch.tensor([0] + [1 + i for i in keep])


def kv_memory(lm, tok, memories: "ReadableMemories", kind: str, doc: str) -> tuple[list, int]:
    """The base LM's per-layer (key, value), each (1, kv_heads, 1 + n, head_dim), of BOS and n positions of the
    document, and the length (1 + document tokens) after which the question's positions continue (RoPE keys
    keep their original positions: a KV-cache eviction of all but n document positions, query-agnostic)."""
    ids, cache = _document_cache(lm, tok, memories, doc)
    index = kept_positions(memories, kind, ids)
    return [(layer.keys[:, :, index], layer.values[:, :, index]) for layer in cache.layers], 1 + len(ids)


@torch.no_grad()
def kv_answer_nll(lm, tok, memory: tuple[list, int], prompt: str, answer: str) -> float:
    """Mean NLL (nats/token) of `` answer<eos>`` after ``prompt``, reading the key/values ``memory``."""
    return kv_answer_loss(lm, tok, memory, prompt, answer).item()


def kv_answer_loss(lm, tok, memory: tuple[list, int], prompt: str, answer: str) -> torch.Tensor:
    """`kv_answer_nll` as a scalar tensor, with the graph back to ``memory``'s key/values (for training them)."""
    kv, offset = memory
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + a])
    cache = DynamicCache(kv, config=lm.config)
    mask = torch.ones(1, kv[0][0].shape[2] + ids.shape[1], dtype=torch.long)
    positions = torch.arange(offset, offset + ids.shape[1])[None]
    logits = lm(input_ids=ids, past_key_values=cache, attention_mask=mask, position_ids=positions).logits[0].float()
    start = logits.shape[0] - len(a)
    return F.cross_entropy(logits[start - 1:-1], torch.tensor(a))


def load_frozen_lm(base_model: str):
    """``embedded`` (SmolLM2-135M-Instruct) or a local path -> (tokenizer, LM in eval mode with every parameter
    frozen, its input-embedding matrix (V, d_emb) detached)."""
    path = embedded_base_model_path() if base_model == "embedded" else base_model
    tok, lm = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    for w in lm.parameters():
        w.requires_grad_(False)
    return tok, lm, lm.get_input_embeddings().weight.detach()


def answer_nlls(lm, tok, embeddings, items) -> torch.Tensor:
    """(B,) mean NLL (nats/token) of `` answer<eos>`` after BOS, a memory (n, d_emb) or None, and a prompt, for
    each item ``(memory, prompt, answer)``, in one right-padded pass (with the graph, for training a reader)."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    seqs, answers = [], []
    for memory, prompt, answer in items:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        memory = embeddings[:0] if memory is None else memory
        seqs.append(torch.cat([embeddings[bos], memory, embeddings[p + a]]))
        answers.append(a)
    lengths = [len(x) for x in seqs]
    n = max(lengths)
    x = torch.stack([F.pad(s, (0, 0, 0, n - len(s))) for s in seqs])
    mask = (torch.arange(n)[None] < torch.tensor(lengths)[:, None]).long() if min(lengths) < n else None
    logits = lm(inputs_embeds=x, attention_mask=mask).logits.float()  # (B, n, V)
    # the answer's tokens are the last len(a) of each unpadded sequence, each predicted one position earlier
    return torch.stack([F.cross_entropy(row[length - len(a) - 1:length - 1], torch.tensor(a))
                        for row, length, a in zip(logits, lengths, answers)])


@torch.no_grad()
def answer_nll(lm, tok, embeddings, memory, prompt: str, answer: str) -> float:
    """`answer_nlls` of one item, as a float."""
    return answer_nlls(lm, tok, embeddings, [(memory, prompt, answer)]).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-model", default="embedded", help="`embedded` (SmolLM2-135M-Instruct) or a local path")
    p.add_argument("--train", required=True, help="QA file whose documents give the IDF and the k-means codebook")
    p.add_argument("--data", required=True, help="QA file to score (one question per document)")
    p.add_argument("--docs", type=int, default=128, help="documents, spread over the file")
    p.add_argument("--slots", type=int, default=12, help="T, memory vectors per document (MBC: 12)")
    p.add_argument("--codebook-size", type=int, default=512)
    p.add_argument("--kmeans-docs", type=int, default=1024)
    p.add_argument("--max-document-tokens", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=8, help="documents per standard-error batch")
    p.add_argument("--kv", nargs="*", choices=KV_KINDS, help="also memories of the LM's own key/values of the "
                   "document (all of these kinds when given without names)")
    p.add_argument("--kv-kmeans-docs", type=int, default=256, help="training documents for the per-layer "
                   "key/value codebooks")
    p.add_argument("--kv-groups", type=int, default=1, help="product quantization: codebooks per layer, each for "
                   "an equal part of the (key, value) pair")
    p.add_argument("--kv-stages", type=int, default=1, help="residual quantization: codes per part")
    p.add_argument("--kinds", nargs="*", default=KINDS, choices=KINDS, help="input-embedding memories to score")
    p.add_argument("--article-pairs", action="store_true", help="batches of same-article pairs "
                   "(`mbc_hf.trainer.article_pair_batches`): score each memory against a paragraph of another article "
                   "and against the other paragraph of the same article, instead of the next document")
    p.add_argument("--output")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    tok, lm, E = load_frozen_lm(a.base_model)
    train_docs = [text for _, text in documents(load_qa_file(a.train))]
    memories = ReadableMemories(tok, E, train_docs, a.slots, a.max_document_tokens, a.kmeans_docs, a.codebook_size)
    rows = first_row_per_document(split_train_eval(load_qa_file(a.data), a.docs)[1])
    kv_kinds = KV_KINDS if a.kv == [] else a.kv or []
    kv_codes = None
    if KV_KINDS[-1] in kv_kinds:
        kv_codes = KVCodebooks(lm, tok, memories, train_docs[:a.kv_kmeans_docs], a.codebook_size, a.kv_groups,
                               a.kv_stages)
    template = MBCConfig().prompt_template
    if a.article_pairs:
        batches, partners = article_pair_batches(rows, a.batch_size), paired_partners(a.batch_size)
    else:  # the unrelated document: the next of the batch (of the whole list for a batch of one)
        batches, partners = [rows[i:i + a.batch_size] for i in range(0, len(rows), a.batch_size)], None
    rows = [r for b in batches for r in b]
    parts, done = [], 0
    for batch in batches:
        sums = defaultdict(float)
        for i, r in enumerate(batch):
            if partners:
                others = {name.replace("_", " "): batch[int(j[i])]["context"] for name, j in partners.items()}
            else:
                others = {"unrelated": (batch[(i + 1) % len(batch)] if len(batch) > 1
                                        else rows[(done + 1) % len(rows)])["context"]}
            prompt, answer = template.format(question=r["question"]), r["answers"][0]
            empty = answer_nll(lm, tok, E, None, prompt, answer)

            def score(kind, nll):  # nll(document) -> answer NLL with that document's memory of this kind
                gold = nll(r["context"])
                sums[f"{kind}: gold NLL"] += gold
                for name, other in others.items():
                    sums[f"{kind}: {name} − gold"] += nll(other) - gold
                sums[f"{kind}: empty − gold"] += empty - gold

            for kind in a.kinds:
                score(kind, lambda doc: answer_nll(lm, tok, E, memories.build(kind, doc), prompt, answer))
            for kind in kv_kinds:
                build = (lambda doc: kv_codes.memory(lm, tok, memories, doc)) if kind == KV_KINDS[-1] else (
                    lambda doc: kv_memory(lm, tok, memories, kind, doc))
                score(kind, lambda doc: kv_answer_nll(lm, tok, build(doc), prompt, answer))
            sums["no memory: NLL"] += empty
        parts.append({k: v / len(batch) for k, v in sums.items()})
        done += len(batch)
        print(f"{done}/{len(rows)} documents", file=sys.stderr)
    mean, stderr, table = batch_mean_table(parts, "memory: quantity", "nats/token", "+.4f")
    coding = {"kv_codes_relative_error": kv_codes.relative_error()} if kv_codes else {}
    print(f"base LM {a.base_model}, untrained; {len(rows)} documents spread over {a.data}, one question each; "
          f"T = {a.slots}, K = {a.codebook_size}\n\n{table}" + (f"\n\n{coding}" if coding else ""))
    if a.output:
        write_json_report(a.output, {"base_model": a.base_model, "data": a.data, "n_docs": len(rows),
                                     **mean, **coding, "standard_error": stderr, "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()

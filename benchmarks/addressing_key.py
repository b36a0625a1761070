"""Addressing with a compact key (issue 36, item 2): top-1 / top-3 of the lexical codes alone, the 48-byte key alone,
the two fused, and BM25 over the full text, on the same questions of the 1,665-document stream, in one run.

    lexical codes      `CodeIndex` over the vocabulary codebook's codes (the product's default: T = 48, trained
                       selector, fitted on the training file as `MBCTrainer.train` does): 96 bytes a document
    key alone          the question's float all-MiniLM-L6-v2 embedding against the documents' binarised ones
                       (asymmetric, `mbc_hf.compact_key.similarity`): 48 bytes a document; and the Hamming distance
                       of the binarised question (FAISS IndexBinaryFlat), for comparison
    key, float cosine  the unquantized 384-dim float32 embeddings (1,536 bytes a document): what binarisation costs
    fused              (1 - w) · lexical relevance + w · key similarity (`mbc_hf.compact_key.fused_search`):
                       96 + 48 bytes a document
    BM25               bm25s over the full text (`mbc_hf.text_store.TextStore`), UTF-8 bytes of the text

The weight w is chosen on SQuAD *train* (``--tune``): the codebook is fitted on the first half of the train articles
and w picked by top-1 on the questions of the other half (their paragraphs as the bank), on a grid of 0.05; the dev
stream never enters the choice. Without ``--tune`` the run uses ``--weight`` (default: the package's
`DEFAULT_FUSION_WEIGHT`, the tuned value). The questions are those of `codes_diagnostic.py` (same seed, same draw).

    python benchmarks/addressing_key.py --tune --output benchmarks/results/addressing_key.json
"""

import argparse
import hashlib
import os
import random
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from mbc_hf.addressing import CodeIndex  # noqa: E402
from mbc_hf.cli import SQUAD_DEV, SQUAD_TRAIN, shared_data_dir  # noqa: E402
from mbc_hf.compact_key import (DEFAULT_FUSION_WEIGHT, FUSION_DEPTH, KeyIndex, SentenceEncoder, binarize,  # noqa: E402
                                fused_scores, fused_search, question_vectors, similarity)
from mbc_hf.data import documents, load_qa_file  # noqa: E402
from mbc_hf.demo import markdown_table, write_json_report  # noqa: E402
from mbc_hf.vocabulary_codebook import VocabularyCodebook  # noqa: E402

GRID = [round(0.05 * i, 2) for i in range(21)]


def embed(encoder: SentenceEncoder, texts: list[str], cache: str | None) -> torch.Tensor:
    """(n, 384) float32 embeddings, cached as safetensors under ``cache`` by a hash of the texts (no pickle)."""
    from safetensors.torch import load_file, save_file

    path = None
    if cache:
        os.makedirs(cache, exist_ok=True)
        digest = hashlib.sha256("\x00".join(texts).encode() + encoder.fingerprint().encode()).hexdigest()[:20]
        path = os.path.join(cache, f"embeddings-{digest}.safetensors")
        if os.path.exists(path):
            return load_file(path)["embeddings"]
    out = encoder.embed(texts)
    if path:
        save_file({"embeddings": out.contiguous()}, path)
    return out


def lexical_setup(tok, train, T: int):
    """A vocabulary codebook fitted on ``train`` (IDF + trained selector) and a function of texts -> codes."""
    from mbc_hf.trainer import document_codes, fit_vocabulary_idf

    book = VocabularyCodebook(len(tok), T, tok.eos_token_id, "trained", "document", False)
    holder = SimpleNamespace(tokenizer=tok, codebook=book, config=SimpleNamespace(max_document_length=256))
    fit_vocabulary_idf(holder, train)
    holder._encode_documents = lambda texts, device=None: ({  # noqa: E731 (the model's, without the truncation count)
        k: v for k, v in tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt",
                             add_special_tokens=False).items() if k != "token_type_ids"}, 0)
    return book, lambda texts: document_codes(holder, texts)


class Stream:
    """A bank of documents and questions about them, with everything addressing needs precomputed."""

    def __init__(self, tok, book, codes_of, encoder, docs, questions, doc_ids, cache):
        position = {d: i for i, (d, _) in enumerate(docs)}
        self.docs, self.questions = docs, questions
        self.gold = torch.tensor([position[d] for d in doc_ids])
        self.codes = codes_of([t for _, t in docs])  # (N, T)
        self.lexical = CodeIndex(self.codes, len(tok))
        q = tok([" " + x for x in questions], add_special_tokens=False, padding=True, return_tensors="pt")
        self.weights = book.question_weights(q["input_ids"], q["attention_mask"])  # (B, V)
        self.doc_emb = embed(encoder, [t for _, t in docs], cache)
        self.q_emb = embed(encoder, list(questions), cache)
        self.doc_keys, self.q_keys = binarize(self.doc_emb), binarize(self.q_emb)
        self.q_vectors = question_vectors(self.q_emb)  # the float question of asymmetric scoring
        self.keys = KeyIndex(self.doc_keys.shape[1])
        self.keys.add(self.doc_keys)

    def accuracy(self, ranked: torch.Tensor) -> dict:
        return {"top1": float((ranked[:, 0] == self.gold).float().mean()),
                "top3": float((ranked[:, :3] == self.gold[:, None]).any(1).float().mean())}

    def fused(self, weight: float, k: int = 3, exact: bool = False) -> torch.Tensor:
        return fused_search(self.lexical, self.keys, self.codes, self.doc_keys, self.weights, self.q_vectors,
                            k, weight, exact=exact)[1]


def tune(tok, encoder, train, T: int, cache) -> dict:
    """w on SQuAD train: codebook fitted on the first half of the articles, w chosen on the other half's questions."""
    article = [d.rsplit("#", 1)[0] for d in train["doc_id"]]  # doc ids are "<article title>#<paragraph>"
    titles = list(dict.fromkeys(article))
    first = set(titles[:len(titles) // 2])
    fit_rows = train.select([i for i, t in enumerate(article) if t in first])
    held = train.select([i for i, t in enumerate(article) if t not in first])
    book, codes_of = lexical_setup(tok, fit_rows, T)
    stream = Stream(tok, book, codes_of, encoder, documents(held), list(held["question"]), list(held["doc_id"]), cache)
    grid = [{"weight": w, **stream.accuracy(stream.fused(w))} for w in GRID]
    best = max(grid, key=lambda r: (r["top1"], r["top3"], -r["weight"]))
    print(markdown_table(grid, ["weight", "top1", "top3"]), flush=True)
    return {"fit_articles": len(first), "held_articles": len(titles) - len(first), "held_docs": len(stream.docs),
            "held_questions": len(stream.questions), "grid": grid, "chosen_weight": best["weight"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", default="embedded", help="whose tokenizer (vocabulary) the codes come from")
    p.add_argument("--encoder", default="embedded", help="the key's sentence encoder (default: all-MiniLM-L6-v2)")
    p.add_argument("--train-file", help=f"default: shared data {SQUAD_TRAIN}")
    p.add_argument("--data", help=f"the stream (default: shared data {SQUAD_DEV})")
    p.add_argument("--docs", type=int, default=1665, help="first N documents of --data: the stream")
    p.add_argument("--questions", type=int, default=600, help="questions drawn over the stream by --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-tokens", type=int, default=48, help="T codes a document (2 bytes each)")
    p.add_argument("--tune", action="store_true", help="choose the fusion weight on SQuAD train first")
    p.add_argument("--weight", type=float, default=DEFAULT_FUSION_WEIGHT, help="fusion weight when not --tune")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "mbc_hf", "key-embeddings"),
                   help="folder of cached embeddings (safetensors); '' for none")
    p.add_argument("--output", help="JSON report")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    from transformers import AutoTokenizer

    from mbc_hf.embedded import resolve
    from mbc_hf.text_store import TextStore

    shared = shared_data_dir()
    train = load_qa_file(a.train_file or shared / SQUAD_TRAIN)
    stream_rows = load_qa_file(a.data or shared / SQUAD_DEV, downsample_to=a.docs)
    picked = sorted(random.Random(a.seed).sample(range(len(stream_rows)), min(a.questions, len(stream_rows))))
    qs = stream_rows.select(picked)
    tok = AutoTokenizer.from_pretrained(resolve(a.base_model, "base"))
    encoder = SentenceEncoder.from_pretrained(a.encoder)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    record = {"args": vars(a)}
    if a.tune:
        record["tuning"] = tune(tok, encoder, train, a.num_tokens, a.cache or None)
        a.weight = record["tuning"]["chosen_weight"]
        print(f"chosen on train: w = {a.weight}", flush=True)
    book, codes_of = lexical_setup(tok, train, a.num_tokens)
    docs = documents(stream_rows)
    s = Stream(tok, book, codes_of, encoder, docs, list(qs["question"]), list(qs["doc_id"]), a.cache or None)

    store = TextStore()
    store.add([d for d, _ in docs], [t for _, t in docs])
    position = {d: i for i, (d, _) in enumerate(docs)}
    bm25 = torch.tensor([[position[d] for d in ids] for ids, _ in store.search(list(qs["question"]), k=3)])
    _, lexical = s.lexical.search(s.weights, 3)
    _, hamming_key = s.keys.search(s.q_keys, 3)
    key = similarity(s.q_vectors, s.doc_keys).sort(dim=1, descending=True, stable=True).indices[:, :3]
    cosine = (s.q_emb @ s.doc_emb.T).topk(3, dim=1).indices
    start = time.perf_counter()
    fused = s.fused(a.weight)  # the product's search: candidates from the top FUSION_DEPTH of each list
    fused_ms = (time.perf_counter() - start) * 1000 / len(qs)
    reference = fused_scores(s.weights, s.codes, s.q_vectors, s.doc_keys, a.weight)
    brute = reference.sort(dim=1, descending=True, stable=True).indices[:, :3]
    assert torch.equal(s.fused(a.weight, exact=True), brute), "exact fused_search differs from brute force"
    agreement = float((fused == brute).all(1).float().mean())  # candidate search vs the exact fused ranking
    text_bytes = round(sum(len(t.encode()) for _, t in docs) / len(docs))
    T = a.num_tokens
    rows = [
        {"addressing": f"lexical codes alone (T = {T})", "bytes/doc": 2 * T, **s.accuracy(lexical)},
        {"addressing": "compact key alone (384 bits; float question)", "bytes/doc": s.doc_keys.shape[1],
         **s.accuracy(key)},
        {"addressing": "compact key alone (384 bits; Hamming, binary question)", "bytes/doc": s.doc_keys.shape[1],
         **s.accuracy(hamming_key)},
        {"addressing": f"fused, w = {a.weight} (chosen on train)", "bytes/doc": 2 * T + s.doc_keys.shape[1],
         **s.accuracy(fused)},
        {"addressing": "BM25 over the full text", "bytes/doc": text_bytes, **s.accuracy(bm25)},
        {"addressing": "(reference) float MiniLM cosine, unquantized", "bytes/doc": 4 * s.doc_emb.shape[1],
         **s.accuracy(cosine)},
    ]
    # the fused score for every w on the dev stream, for the record only (w is NOT chosen here)
    record["dev_weight_sweep"] = [{"weight": w, **s.accuracy(s.fused(w))} for w in GRID]
    table = markdown_table(rows, ["addressing", "bytes/doc", "top1", "top3"])
    print(f"\n{len(docs)} documents, {len(qs)} questions (seed {a.seed}); fused search {fused_ms:.2f} ms/question, "
          f"top-3 equal to the exact (brute-force) fused ranking for {agreement:.1%} of the questions\n\n{table}")
    record.update({"rows": rows, "n_docs": len(docs), "n_questions": len(qs), "weight": a.weight,
                   "fused_ms_per_question": fused_ms, "key_index": s.keys.description,
                   "fused_top3_equal_to_exact": agreement, "fusion_depth": FUSION_DEPTH,
                   "goal": {"bm25_top1": rows[4]["top1"], "fused_top1": rows[3]["top1"],
                            "met": rows[3]["top1"] >= rows[4]["top1"] and rows[3]["bytes/doc"] <= 96 + 48},
                   "command": "python " + " ".join(["benchmarks/addressing_key.py", *(argv or sys.argv[1:])])})
    if a.output:
        write_json_report(a.output, record)
    return record


if __name__ == "__main__":
    main()

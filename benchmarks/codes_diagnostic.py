"""What a vocabulary codebook's codes can carry, without the LM: for each selection choice (selector, whole words,
T), addressing accuracy of the codes against BM25 over the full text, and answer recall@T, on the same questions.

    addressing top-1 / top-3   the gold document is ranked first / among the first 3 by `CodeIndex` over the
                               stream's codes (the package's addressing), or by BM25 over the stream's full text
                               (`mbc_hf.text_store.TextStore`: bm25s, English stop words)
    answer recall@T            share of questions whose answer's LM tokens (shortest reference, with a leading
                               space, as inside a text) are all among the gold document's T codes

The IDF and the trained selector are fitted on the training file (`mbc_hf.trainer.fit_vocabulary_idf`, as
`MBCTrainer.train` does). Only tokenization and scoring run: a few minutes on one core (query times are measured
by qa_squad.py, on a quiet machine).

    python benchmarks/codes_diagnostic.py --output benchmarks/results/codes_diagnostic.json
"""

import argparse
import random
from types import SimpleNamespace

import torch
from transformers import AutoTokenizer

from mbc_hf.addressing import CodeIndex
from mbc_hf.cli import SQUAD_DEV, SQUAD_TRAIN, shared_data_dir
from mbc_hf.data import documents, load_qa_file
from mbc_hf.demo import markdown_table, write_json_report
from mbc_hf.embedded import resolve
from mbc_hf.text_store import TextStore
from mbc_hf.trainer import document_codes, fit_vocabulary_idf
from mbc_hf.vocabulary_codebook import VocabularyCodebook


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", default="embedded", help="whose tokenizer (vocabulary) the codes come from")
    p.add_argument("--train-file", help=f"default: shared data {SQUAD_TRAIN}")
    p.add_argument("--data", help=f"the stream (default: shared data {SQUAD_DEV})")
    p.add_argument("--docs", type=int, default=1665, help="first N documents of --data: the stream")
    p.add_argument("--questions", type=int, default=600, help="questions drawn over the stream by --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", default="12,24,48,96", help="values of T")
    p.add_argument("--output", help="JSON report")
    a = p.parse_args(argv)
    shared = shared_data_dir()
    train = load_qa_file(a.train_file or shared / SQUAD_TRAIN)
    stream = load_qa_file(a.data or shared / SQUAD_DEV, downsample_to=a.docs)
    picked = sorted(random.Random(a.seed).sample(range(len(stream)), min(a.questions, len(stream))))
    qs = stream.select(picked)
    tok = AutoTokenizer.from_pretrained(resolve(a.base_model, "base"))
    docs = documents(stream)
    position = {doc_id: i for i, (doc_id, _) in enumerate(docs)}
    gold = torch.tensor([position[d] for d in qs["doc_id"]])
    q = tok([" " + x for x in qs["question"]], add_special_tokens=False, padding=True, return_tensors="pt")
    answers = [set(ids) for ids in tok([" " + min(r, key=len) for r in qs["answers"]],
                                       add_special_tokens=False)["input_ids"]]

    def accuracy(ranked: torch.Tensor) -> dict:
        return {"top1": float((ranked[:, 0] == gold).float().mean()),
                "top3": float((ranked[:, :3] == gold[:, None]).any(1).float().mean())}

    store = TextStore()
    store.add([d for d, _ in docs], [t for _, t in docs])
    bm25 = torch.tensor([[position[d] for d in ids] for ids, _ in store.search(list(qs["question"]), k=3)])
    rows = [{"codes": "BM25 over the full text", "T": "—", "bytes/doc": round(sum(len(t.encode()) for _, t in docs)
                                                                               / len(docs)),
             **accuracy(bm25), "answer_recall": 1.0}]
    for selector in ("idf", "trained"):
        for whole in (False, True):
            for T in map(int, a.sizes.split(",")):
                book = VocabularyCodebook(len(tok), T, tok.eos_token_id, selector, "importance", whole)
                holder = SimpleNamespace(tokenizer=tok, codebook=book, config=SimpleNamespace(max_document_length=256))
                fit_vocabulary_idf(holder, train)
                holder._encode_documents = lambda texts, device=None: ({  # noqa: E731 (the model's, no truncation count)
                    k: v for k, v in tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt",
                                         add_special_tokens=False).items() if k != "token_type_ids"}, 0)
                codes = document_codes(holder, [t for _, t in docs])  # (N, T)
                _, ranked = CodeIndex(codes, len(tok)).search(book.question_weights(q["input_ids"],
                                                                                    q["attention_mask"]), 3)
                held = [set(codes[i].tolist()) for i in gold.tolist()]
                recall = sum(ans <= h for ans, h in zip(answers, held)) / len(qs)
                rows.append({"codes": f"{selector}{', whole words' if whole else ''}", "T": T, "bytes/doc": 2 * T,
                             **accuracy(ranked), "answer_recall": recall})
                print(markdown_table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
    table = markdown_table(rows, ["codes", "T", "bytes/doc", "top1", "top3", "answer_recall"])
    print(f"\n{len(docs)} documents, {len(qs)} questions (seed {a.seed})\n\n{table}")
    record = {"rows": rows, "n_docs": len(docs), "n_questions": len(qs), "args": vars(a)}
    if a.output:
        write_json_report(a.output, record)
    return record


if __name__ == "__main__":
    main()

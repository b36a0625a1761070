"""Is it the reader or the bank? Memories of T = 12 integers per document, read by the same trained reader:

* ``rare tokens``: the document's 12 highest-IDF token ids (16 bits each with this vocabulary), read as the LM's own
  input embeddings (frozen);
* ``k-means codes``: MBC's bank format, 12 codes of a 512-entry k-means codebook of segment means (9 bits each;
  `readable_memory.ReadableMemories`), read through a trainable code table started at the centroids;
* ``rare-token codes``: the same bank format with other content: the 12 highest-IDF token embeddings through a
  ``--codebook-size`` k-means codebook fit on those of the first 1,024 training documents (9 bits each for 512),
  read through a trainable code table started at the centroids.

The memory sits between BOS and the question of the frozen base LM; the reader is KV-LoRA (`mbc_hf.kv_lora`, r = 16,
the key/value projections of every layer) plus, for the codes, the code table, trained with the answer NLL of
SQuAD train questions reading their gold document's memory (AdamW, batches of 8, a time budget). Dev documents come
in same-article pairs (`mbc_hf.trainer.article_pair_batches`): answer NLL (nats per answer token) with the gold
memory, and the gain against a paragraph of another article, against the other paragraph of the same article and
against no memory (± standard error over documents), before and after training. A probe, not part of the package.

    python research/token_memory_reader.py --memory "rare tokens" \
        --train ../shared/data/squad/train-part.first44articles.paragraphs.jsonl \
        --data ../shared/data/squad/dev.minus-holdout.paragraphs.jsonl --minutes 30
"""
import argparse
import random
import time

import torch
from readable_memory import ReadableMemories, answer_nlls, load_frozen_lm

from mbc_hf.cli import split_train_eval
from mbc_hf.codebook import VectorQuantizer
from mbc_hf.configuration_mbc import MBCConfig
from mbc_hf.data import documents, load_qa_file
from mbc_hf.demo import write_json_report
from mbc_hf.kv_lora import KVLoraConfig, apply_kv_lora
from mbc_hf.trainer import article_pair_batches, first_row_per_document, paired_partners

MEMORIES = ["rare tokens", "k-means codes", "rare-token codes"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory", choices=MEMORIES, required=True)
    p.add_argument("--base-model", default="embedded", help="`embedded` (SmolLM2-135M-Instruct) or a local path")
    p.add_argument("--train", required=True, help="QA file: IDF, k-means codebook and training questions")
    p.add_argument("--data", required=True, help="QA file of the dev documents (one question each)")
    p.add_argument("--docs", type=int, default=256, help="dev documents spread over the file, before pairing")
    p.add_argument("--minutes", type=float, default=30, help="training time budget")
    p.add_argument("--codebook-size", type=int, default=512, help="K of the rare-token codebook")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N training questions (0: off)")
    p.add_argument("--seed", type=int, default=0, help="torch and question-order seed")
    p.add_argument("--output", help="write the evaluations (JSON)")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed); random.seed(a.seed)
    tok, lm, E = load_frozen_lm(a.base_model)
    train_rows = load_qa_file(a.train)
    train_docs = [t for _, t in documents(train_rows)]
    mem = ReadableMemories(tok, E, train_docs, 12, 384, 1024, 512)
    lm = apply_kv_lora(lm, KVLoraConfig(r=16, lora_dropout=0.0, last_n_layers=lm.config.num_hidden_layers))
    params = [w for w in lm.parameters() if w.requires_grad]
    vq, table = mem.vq, None
    if a.memory == "rare-token codes":
        vq = VectorQuantizer(a.codebook_size, E.shape[1]).eval()
        vq.kmeans_init(torch.cat([mem.build("rare tokens", d) for d in train_docs[:1024]]))
    if a.memory != "rare tokens":
        table = torch.nn.Parameter(vq.decode(torch.arange(vq.codebook_size)).detach().clone())
        params.append(table)

    def memory(doc: str) -> torch.Tensor:  # (12, d_emb)
        if a.memory == "rare tokens":
            return mem.build("rare tokens", doc)
        if a.memory == "rare-token codes":
            return table[vq.nearest_codes(mem.build("rare tokens", doc))]
        return table[vq.nearest_codes(mem.segment_means(mem.ids(doc))[None])[0]]

    template = MBCConfig().prompt_template

    def nlls(items) -> torch.Tensor:  # items: (memory (n, d) or None, question, answer) -> (B,) answer NLL
        return answer_nlls(lm, tok, E, [(m, template.format(question=q), ans) for m, q, ans in items])

    dev_batches = article_pair_batches(
        first_row_per_document(split_train_eval(load_qa_file(a.data), a.docs)[1]), a.batch_size)
    partners = paired_partners(a.batch_size)
    dev_rows = [r for b in dev_batches for r in b]
    hits = []  # per dev answer: which of its tokens are among its document's 12 highest-IDF tokens
    for r in dev_rows:
        rare = set(sorted(set(mem.ids(r["context"])), key=mem.weight, reverse=True)[:12])
        hits.append([t in rare for t in tok(" " + r["answers"][0], add_special_tokens=False)["input_ids"]])
    print(f"dev answers: {sum(sum(h) / len(h) for h in hits) / len(hits):.0%} of their tokens (mean over answers) "
          f"are among their document's 12 highest-IDF tokens; {sum(map(any, hits)) / len(hits):.0%} have at least "
          f"one there", flush=True)
    curve, t0 = [], time.time()

    @torch.no_grad()
    def evaluate(tag, questions=0):
        lm.eval()
        diffs = {"gold": [], "other_article_minus_gold": [], "same_article_minus_gold": [], "empty_minus_gold": []}
        for batch in dev_batches:
            docs = [memory(r["context"]) for r in batch]
            qa = [(r["question"], r["answers"][0]) for r in batch]
            gold = nlls([(docs[i], *qa[i]) for i in range(len(batch))])
            other = nlls([(docs[int(partners["other_article"][i])], *qa[i]) for i in range(len(batch))])
            same = nlls([(docs[int(partners["same_article"][i])], *qa[i]) for i in range(len(batch))])
            empty = nlls([(None, *qa[i]) for i in range(len(batch))])
            for k, v in (("gold", gold), ("other_article_minus_gold", other - gold),
                         ("same_article_minus_gold", same - gold), ("empty_minus_gold", empty - gold)):
                diffs[k] += v.tolist()
        stats = {k: (torch.tensor(v).mean().item(), (torch.tensor(v).std() / len(v) ** .5).item())
                 for k, v in diffs.items()}
        for k in ("other_article", "same_article"):  # share of documents where the gold memory is the better one
            stats[f"gold_better_than_{k}"] = sum(x > 0 for x in diffs[f"{k}_minus_gold"]) / len(diffs["gold"])
        curve.append({"tag": tag, "questions": questions, "minutes": (time.time() - t0) / 60, **stats})
        t = lambda k: f"{stats[k][0]:+.3f} ± {stats[k][1]:.3f}"
        print(f"[{tag}] dev {len(diffs['gold'])}: gold {t('gold')}  other article−gold "
              f"{t('other_article_minus_gold')} (gold better on {stats['gold_better_than_other_article']:.0%})  "
              f"same article−gold {t('same_article_minus_gold')} (gold better on "
              f"{stats['gold_better_than_same_article']:.0%})  empty−gold {t('empty_minus_gold')}", flush=True)
        if a.output:
            write_json_report(a.output, {"args": vars(a), "evaluations": curve})
        lm.train()

    evaluate("before training")
    order = list(train_rows)
    random.shuffle(order)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    t0, seen, losses = time.time(), 0, []
    while time.time() - t0 < a.minutes * 60 and seen < len(order):
        batch = order[seen:seen + a.batch_size]
        loss = nlls([(memory(r["context"]), r["question"], r["answers"][0]) for r in batch]).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        seen += len(batch); losses.append(loss.item())
        if len(losses) % 50 == 0:
            print(f"{seen} questions, {(time.time() - t0) / 60:.1f} min, loss {sum(losses[-50:]) / 50:.3f}",
                  flush=True)
        if a.eval_every and seen // a.eval_every != (seen - len(batch)) // a.eval_every:
            evaluate(f"{seen} questions", seen)
    if curve[-1]["questions"] != seen:  # not evaluated at this point already
        evaluate(f"trained, {seen} questions", seen)


if __name__ == "__main__":
    main()

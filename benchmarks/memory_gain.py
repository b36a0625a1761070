"""Memory gain of a trained MBC model: does the answer (and the document itself) get likelier with the gold document
in memory than with an empty memory or an unrelated document? Prints a markdown table (mean over batches of
``--batch-size`` documents, with the standard error over batches), the gains per question with a 95 % bootstrap
interval over questions (`scipy.stats.bootstrap`, percentile), writes JSON.

    python benchmarks/memory_gain.py --model runs/mbc-smollm2 \
        --data ../shared/data/squad/dev.minus-holdout.paragraphs.jsonl --docs 64 \
        --output benchmarks/results/memory_gain.json
"""
import argparse
import sys

import mbc_hf  # noqa: F401
import torch
from scipy.stats import bootstrap
from transformers import AutoModelForCausalLM

from mbc_hf.cli import split_train_eval
from mbc_hf.data import load_qa_file
from mbc_hf.demo import batch_mean_table, markdown_table, write_json_report
from mbc_hf.trainer import (MBCDataCollator, article_of, article_pair_batches, first_row_per_document, memory_gain,
                            paired_partners, question_gains)


@torch.no_grad()
def code_statistics(model, batch, partner: list[int] | None = None) -> dict[str, float]:
    """Distinct codes per document (of T) and the Jaccard overlap of a document's code set with that of its
    unrelated document (``partner[i]``; by default the next one of the batch, as in `memory_gain`); empty for a
    model without VQ."""
    if not model.config.use_vq:
        return {}
    if model.uses_vocabulary_codebook:  # codes are the documents' highest-IDF tokens
        codes = model.codebook.select(batch["context_input_ids"], batch["context_attention_mask"])
    else:
        codes = model.codebook.nearest_codes(model.amortization(batch["context_input_ids"],
                                                                batch["context_attention_mask"]))
    sets = [set(row.tolist()) for row in codes]
    n = len(sets)
    partner = partner or [(i + 1) % n for i in range(n)]
    overlap = [len(sets[i] & sets[partner[i]]) / len(sets[i] | sets[partner[i]]) for i in range(n)]
    return {"distinct_codes_per_doc": sum(map(len, sets)) / n, "code_overlap_with_unrelated": sum(overlap) / n}


def bootstrap_intervals(per_question: dict[str, list[float]], seed: int = 0) -> dict[str, dict]:
    """name -> per-question gains (nats/token) -> name -> {mean, low, high (the 95 % bootstrap interval of the
    mean over questions), n, excludes_zero}."""
    out = {}
    for name, values in per_question.items():
        ci = bootstrap((values,), lambda x, axis: x.mean(axis=axis), n_resamples=10_000, confidence_level=0.95,
                       method="percentile", rng=seed).confidence_interval
        out[name] = {"mean": sum(values) / len(values), "low": float(ci.low), "high": float(ci.high),
                     "n": len(values), "excludes_zero": bool(ci.low > 0 or ci.high < 0)}
    return out


def interval_table(intervals: dict[str, dict]) -> str:
    return markdown_table([{"gain": k, "mean (nats/token)": f"{v['mean']:+.4f}",
                            "95 % interval": f"[{v['low']:+.4f}, {v['high']:+.4f}]", "questions": v["n"],
                            "excludes 0": "yes" if v["excludes_zero"] else "no"} for k, v in intervals.items()],
                          ["gain", "mean (nats/token)", "95 % interval", "questions", "excludes 0"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="QA file; one question per document is used")
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--spread", action="store_true", help="take the documents evenly spaced over the whole file "
                   "instead of the first N in order (consecutive paragraphs of one article); with --docs above the "
                   "number of articles, most next documents are still of the same article: see --article-pairs")
    p.add_argument("--batch-size", type=int, default=8, help="documents per batch (the unrelated memory is the "
                                                                 "next document of the batch)")
    p.add_argument("--article-pairs", action="store_true", help="batches of pairs of documents from one article "
                   "(`article_pair_batches`): each question also reads a paragraph of another article "
                   "(other_article: does the memory hold the topic?) and the other paragraph of its own article "
                   "(same_article: does it hold the paragraph?), instead of the next document")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--output")
    a = p.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    if model.config.reconstruction_loss_weight <= 0 and not model.uses_vocabulary_codebook:
        model.config.reconstruction_loss_weight = 1.0  # only so the collator adds the reconstruction targets
    if a.spread:
        source = split_train_eval(load_qa_file(a.data), a.docs)[1]
    else:
        source = load_qa_file(a.data, downsample_to=a.docs)
    rows = first_row_per_document(source)
    if a.article_pairs:
        batches, partners = article_pair_batches(rows, a.batch_size), paired_partners(a.batch_size)
        rows = [r for b in batches for r in b]
    else:
        batches, partners = [rows[i:i + a.batch_size] for i in range(0, len(rows), a.batch_size)], None
    collate, parts, per_question = MBCDataCollator(model), [], {}
    for rows_ in batches:
        batch = collate(rows_)
        other = partners["other_article"].tolist() if partners else None  # code overlap with another article
        parts.append({**memory_gain(model, batch, partners), **code_statistics(model, batch, other)})
        for name, gains in question_gains(model, batch, partners).items():
            per_question.setdefault(name, []).extend(gains.tolist())
    mean, stderr, table = batch_mean_table(parts, "quantity", "nats/token", "+.4f")
    intervals = bootstrap_intervals(per_question, a.seed)
    articles = len({article_of(r["doc_id"]) for r in rows})
    order = "spread over the file" if a.spread else "first in file order"
    print(f"{len(rows)} documents of {articles} articles ({order}{', in same-article pairs' if a.article_pairs else ''}"
          f"), one question each, from {a.data}\n\n{table}\n\nPer question (95 % bootstrap interval over "
          f"questions, percentile, 10,000 resamples):\n\n{interval_table(intervals)}")
    if a.output:
        write_json_report(a.output, {"model": a.model, "data": a.data, "n_docs": len(rows),
                                     "spread": a.spread, "article_pairs": a.article_pairs,
                                     "doc_ids": [r["doc_id"] for r in rows], **mean,
                                     "standard_error": stderr, "per_question": intervals,
                                     "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()

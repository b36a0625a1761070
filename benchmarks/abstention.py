"""Abstention ("a memory that knows when it has nothing", ``MBCConfig.relevance_threshold``): calibrate the
relevance threshold on training data, then measure on unseen data how it splits the questions.

1. Calibration (``--train``): half the training articles go in a bank; the threshold is the one that flags at most
   ``--max-flagged`` of the questions about them (answerable) as not grounded
   (`mbc_hf.evaluation.calibrate_abstention`).
2. Rates (``--data``, first ``--downsample-to`` documents, unseen in training): a bank of half the documents, the
   share of questions about the other half (absent) flagged not grounded, and of answerable ones wrongly flagged;
   split by article (an absent question's article is in no stored document) and by document (its article's other
   paragraphs are stored). Addressing only: no generation, cheap.
3. With ``--f1-questions N`` (LM generation, ~1 s per question on CPU): F1 on N questions of the stream
   (``random.Random(--question-seed)``) read from the empty memory, from a bank of unrelated documents (the file's
   documents beyond the stream, as ``qa_squad.py``'s ``unrelated`` row) and from the stream's own bank, each without
   and with the threshold.

    python benchmarks/abstention.py --model shipped \\
        --train ../shared/data/squad/train-part.first44articles.paragraphs.jsonl \\
        --data ../shared/data/squad/dev.minus-holdout.paragraphs.jsonl --downsample-to 1665 \\
        --output benchmarks/results/abstention.json [--f1-questions 100] [--save-to DIR]

``--save-to DIR`` writes the calibrated threshold into ``DIR/config.json`` (a saved model folder; it then loads
with abstention on).
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np


def load(spec: str, addressing_key: str | None = None):
    if spec == "shipped":
        from mbc_hf import pretrained

        if addressing_key:
            raise SystemExit("--addressing-key needs a saved model folder (e.g. python -c \"import mbc_hf; "
                             "mbc_hf.pretrained.load().save_pretrained('runs/shipped')\", then --model runs/shipped)")
        return pretrained.load()
    from mbc_hf.factory import load_model

    return load_model(spec, **({"addressing_key": addressing_key} if addressing_key else {})).eval()


def curve(rates: dict, shares=(0.01, 0.02, 0.05, 0.10, 0.20)) -> list[dict]:
    """The trade-off: for thresholds wrongly flagging each share of the answerable questions, the absent share."""
    from mbc_hf.addressing import calibrate_threshold

    out = []
    for share in shares:
        t = calibrate_threshold(rates["answerable_relevance"], share)
        out.append({"max_flagged": share, "threshold": t,
                    "answerable_flagged": float(np.mean(rates["answerable_relevance"] < t)),
                    "absent_flagged": float(np.mean(rates["absent_relevance"] < t))})
    return out


def _public(rates: dict) -> dict:
    return {k: v for k, v in rates.items() if not isinstance(v, np.ndarray)}


def f1_rows(model, data: str, downsample_to: int, n_questions: int, seed: int, threshold: float) -> dict:
    from mbc_hf.data import documents, load_qa_file
    from mbc_hf.evaluation import score

    stream = load_qa_file(data, downsample_to=downsample_to)
    picked = sorted(random.Random(seed).sample(range(len(stream)), min(n_questions, len(stream))))
    ds = stream.select(picked)
    asked = set(stream["context"])
    unrelated = [d for d in documents(load_qa_file(data)) if d[1] not in asked]
    own = documents(stream)
    banks = {"empty": None,
             "unrelated": model.memorize([t for _, t in unrelated], doc_ids=[i for i, _ in unrelated]),
             "stream": model.memorize([t for _, t in own], doc_ids=[i for i, _ in own])}
    questions, rows = list(ds["question"]), {}
    for name, bank in banks.items():
        for label, value in (("off", None), ("on", threshold)):
            if bank is None and label == "on":
                continue  # an empty bank reads nothing either way
            model.config.relevance_threshold = value
            start = time.perf_counter()
            out = model.answer(questions, memory_bank=bank, max_new_tokens=16, return_sources=True)
            r = score([o["answer"] for o in out], ds)
            r.update(query_ms=(time.perf_counter() - start) * 1000 / len(questions),
                     grounded=float(np.mean([o["grounded"] for o in out])),
                     bank_docs=0 if bank is None else len(bank), predictions=[o["answer"] for o in out])
            rows[name if bank is None else f"{name}_threshold_{label}"] = r
            print(f"  {name:9s} threshold {label:3s}: F1 {r['f1']:.2f}  EM {r['em']:.2f}  grounded "
                  f"{100 * r['grounded']:.0f} %", flush=True)
    model.config.relevance_threshold = threshold
    return {"n_questions": len(questions), "question_seed": seed, "unrelated_docs": len(unrelated), "rows": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shipped", help="'shipped' (mbc_hf.pretrained) or a saved model folder")
    p.add_argument("--train", required=True, help="QA file of training data (calibration)")
    p.add_argument("--data", required=True, help="QA file of unseen data (measurement)")
    p.add_argument("--downsample-to", type=int, default=1665, help="first N unique documents of --data")
    p.add_argument("--max-flagged", type=float, default=0.05,
                   help="share of answerable training questions the threshold may flag (default 0.05)")
    p.add_argument("--f1-questions", type=int, default=0, help="also measure F1 on N questions (generation)")
    p.add_argument("--question-seed", type=int, default=0)
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--addressing-key", choices=["minilm-binary"], help="turn the compact key on (banks store it; "
                   "the relevance is the fused score, MBCConfig.addressing_key); needs a model folder")
    p.add_argument("--save-to", help="write the calibrated threshold into this model folder's config.json")
    a = p.parse_args(argv)

    from mbc_hf.data import load_qa_file
    from mbc_hf.evaluation import abstention_rates, calibrate_abstention

    model = load(a.model, a.addressing_key)
    model.config.relevance_threshold = None
    start = time.perf_counter()
    cal = calibrate_abstention(model, load_qa_file(a.train), max_flagged=a.max_flagged, by="article")
    threshold = cal["threshold"]
    print(f"calibrated on {a.train}: threshold {threshold:.4f} (bank of {cal['n_bank_docs']} documents; "
          f"{cal['n_answerable']} answerable questions, {100 * cal['answerable_flagged']:.1f} % flagged; "
          f"{cal['n_absent']} absent, {100 * cal['absent_flagged']:.1f} % flagged)", flush=True)
    data = load_qa_file(a.data, downsample_to=a.downsample_to)
    result = {"model": a.model, "addressing_key": a.addressing_key, "train": a.train, "data": a.data,
              "downsample_to": a.downsample_to, "max_flagged": a.max_flagged, "threshold": threshold,
              "calibration": _public(cal), "calibration_curve": curve(cal)}
    for by in ("article", "document"):
        rates = abstention_rates(model, data, threshold=threshold, by=by)
        result[f"unseen_by_{by}"] = {**_public(rates), "curve": curve(rates)}
        print(f"unseen, split by {by}: bank of {rates['n_bank_docs']} documents; absent questions flagged "
              f"{100 * rates['absent_flagged']:.1f} % (n={rates['n_absent']}), answerable wrongly flagged "
              f"{100 * rates['answerable_flagged']:.1f} % (n={rates['n_answerable']})", flush=True)
    result["rates_seconds"] = time.perf_counter() - start
    model.config.relevance_threshold = threshold
    if a.f1_questions:
        result["f1"] = f1_rows(model, a.data, a.downsample_to, a.f1_questions, a.question_seed, threshold)
    if a.save_to:
        path = Path(a.save_to) / "config.json"
        config = json.loads(path.read_text())
        config["relevance_threshold"] = threshold
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        print(f"wrote relevance_threshold={threshold} into {path}")
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)

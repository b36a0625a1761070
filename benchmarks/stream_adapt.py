"""Streaming adaptation at scale: memorize N documents from a lazy stream with `mbc_hf.evaluation.adapt_stream` and
show that memory stays bounded (only the bank grows, by its bytes per document). Prints a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/stream_adapt.py --docs 100000                     # tiny random model
    OMP_NUM_THREADS=1 python benchmarks/stream_adapt.py --docs 2000 --model runs/mbc-smollm2 \
        --source squad --data ../shared/data/squad/dev.minus-holdout.paragraphs.jsonl

Documents are generated on the fly: ``synthetic`` (default) builds document i from a seeded word list; ``squad``
reads the paragraphs of a paragraph JSONL file line by line, over and over, prefixing each with its stream index so
every document is new (nothing is copied or kept). Rows are measured while the stream is read (the bank then holds
the documents of all complete batches before that point).
"""

import argparse
import json
import random
import sys
import time

WORDS = ("cat dog owl fox river city museum painting room code item costs euros news science sport quick brown lazy "
         "old wise capital book day year team match won lost north south bridge tower king queen war peace").split()


def synthetic(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        yield f"Document {i}: {words} {rng.randint(0, 10**6)}."


def squad_paragraphs(n: int, path: str):
    i = 0
    while True:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if i == n:
                    return
                if line.strip():
                    yield f"[{i}] " + json.loads(line)["context"]
                    i += 1
        if i == 0:
            raise ValueError(f"{path}: no paragraphs")


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--model", default="tiny", help="'tiny' (mbc_hf.testing.tiny_mbc_model) or a saved MBC model")
    p.add_argument("--source", choices=["synthetic", "squad"], default="synthetic")
    p.add_argument("--data", help="paragraph JSONL for --source squad")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--points", type=int, default=10, help="measurements along the stream")
    p.add_argument("--bank", help="also save the bank here at the end (and every --save-every documents)")
    p.add_argument("--save-every", type=int)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.source == "squad" and not a.data:
        p.error("--source squad needs --data")

    import torch

    from mbc_hf.demo import markdown_table
    from mbc_hf.evaluation import adapt_stream, peak_rss_mb

    torch.set_num_threads(a.threads)
    rss_before_model = rss_mib()
    if a.model == "tiny":
        from mbc_hf.testing import tiny_mbc_model

        model = tiny_mbc_model(seed=a.seed).eval()
    else:
        from mbc_hf.cli import load_model

        model = load_model(a.model)
    bank = model.new_memory_bank()
    texts = synthetic(a.docs, a.seed) if a.source == "synthetic" else squad_paragraphs(a.docs, a.data)
    every = max(1, a.docs // a.points)
    rows = []
    start = time.perf_counter()

    def measure(n_read: int) -> None:
        seconds = time.perf_counter() - start
        rows.append({"docs read": n_read, "docs in bank": len(bank), "seconds": seconds,
                     "docs/s": len(bank) / seconds if seconds else 0.0, "RSS MiB": rss_mib(),
                     "peak RSS MiB": peak_rss_mb(), "bank bytes": bank.nbytes,
                     "bytes/doc": bank.nbytes / len(bank) if len(bank) else 0.0})

    def measured(stream):
        measure(0)
        for i, text in enumerate(stream, 1):
            yield text
            if i % every == 0 and i < a.docs:
                measure(i)

    adapt_stream(model, measured(texts), bank, batch_size=a.batch_size, show_progress=False, save_every=a.save_every,
                 bank_path=a.bank)
    measure(a.docs)
    columns = ["docs read", "docs in bank", "seconds", "docs/s", "RSS MiB", "peak RSS MiB", "bank bytes",
               "bytes/doc"]
    print(f"model {a.model} (T={model.config.num_context_tokens}, K={model.config.codebook_size}, bank dtype "
          f"{str(bank.dtype).replace('torch.', '')}), source {a.source}, batch size {a.batch_size}, "
          f"{a.threads} thread(s); RSS before loading the model {rss_before_model:.0f} MiB, after "
          f"{rows[0]['RSS MiB']:.0f} MiB\n")
    print(markdown_table(rows, columns))
    warm, last = rows[min(1, len(rows) - 1)], rows[-1]
    growth, added = last["RSS MiB"] - warm["RSS MiB"], last["docs in bank"] - warm["docs in bank"]
    print(f"\n{len(bank)} documents in {last['seconds']:.1f} s ({last['docs/s']:.0f} docs/s). From the second row "
          f"(after warm-up) to the end RSS grew {growth:.1f} MiB for {added} more documents "
          f"({growth * 2**20 / max(added, 1):.0f} bytes/doc; the bank's codes + id bytes are {last['bytes/doc']:.1f} "
          f"bytes/doc, the rest is Python's per-id str/list/dict overhead)\ncommand: {' '.join(sys.argv)}")
    return rows


if __name__ == "__main__":
    main()

"""How a compressed bank scales: disk bytes per document, save / append-1,000 / load seconds, peak RSS and
addressing latency per question, at 100k, 1M and 10M documents (issue 21).

Codes are made directly (no model): T codes per document drawn from a Zipf distribution over the K = 49,152
vocabulary ids (``--zipf 1``: rank r with probability ∝ 1/r, as word frequencies; ``--zipf 0``: uniform codes,
every posting list equally short), short ids (the row number in hex). The bank is saved as shards with a JSON index
(``bank.index.json``, 2^20 rows a shard); "append" adds 1,000 documents to the loaded bank and saves it again to the
same index (only a new shard is written). Addressing: `mbc_hf.addressing.CodeIndex` (exact, the brute-force
ranking), one question at a time, 10 distinct question tokens drawn from the same distribution, weighted by their
IDF in the bank. ``--max-postings L`` adds the approximate search (`CodeIndex.search(..., max_postings=L)`, at most
L postings read per question token) on the same questions: its p50 / p95 and its recall, the share of the exact top-3
documents it returns (``approx_recall``) and the share of questions whose top-3 scores equal the exact ones
(``approx_same_scores``: a tie swapped for an equal-scoring document counts as the same). Each size runs in its own
process, so peak RSS (``ru_maxrss``) is that size's alone. A last part memorizes documents with the tiny random
model end to end.

``--key`` measures the compact key's search instead (issue 36; `mbc_hf.compact_key.KeyIndex`, what a bank with keys
builds): N synthetic random 48-byte keys, the index built by appending them in 10 parts, then one question at a
time, its 64 nearest keys (`fused_search`'s first depth): ms per question, build seconds and the index's RAM (RSS
growth while it is built, and FAISS's own bytes). Beyond `EXACT_MAX_DOCS` the index is the approximate IVF one: the
exact flat search is then timed too, and the approximate one's recall@10 against it (random keys have no cluster
structure, the worst case for IVF's recall; real sentence keys cluster).

    python benchmarks/bank_scale.py --docs 100000 1000000 10000000 --output benchmarks/results/scale.json
    python benchmarks/bank_scale.py --key --docs 100000 1000000 10000000 --output benchmarks/results/scale_key.json
"""

import argparse
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from mbc_hf.addressing import CodeIndex  # noqa: E402
from mbc_hf.demo import markdown_table, write_json_report  # noqa: E402
from mbc_hf.memory_bank import CompressedMemoryBank  # noqa: E402

V = 49152
FP = "sha256:bank-scale-benchmark"


def zipf_codes(n: int, t: int, seed: int, exponent: float = 1.0) -> torch.Tensor:
    """(n, t) int64 codes: rank r of the V ids with probability ∝ r^-exponent (0: uniform)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, V + 1) ** exponent
    cdf = np.cumsum(p / p.sum())
    out = np.empty((n, t), dtype=np.int64)
    for lo in range(0, n, 1 << 20):  # in blocks: 10M x 12 int64 at once would be another 1 GB
        hi = min(n, lo + (1 << 20))
        out[lo:hi] = np.minimum(np.searchsorted(cdf, rng.random((hi - lo, t))), V - 1)
    return torch.from_numpy(out)


def latencies(index: CodeIndex, weights: list, max_postings: int | None) -> tuple[list, list]:
    """Search each (1, V) question alone, top 3: (milliseconds per question, (scores, docs) per question)."""
    ms, results = [], []
    for w in weights:
        start = time.perf_counter()
        results.append(index.search(w, 3, max_postings))
        ms.append((time.perf_counter() - start) * 1000)
    return ms, results


def one_size(n: int, t: int, questions: int, seed: int, exponent: float, max_postings: int | None, queue) -> None:
    torch.set_num_threads(1)
    directory = tempfile.mkdtemp(prefix="bank-scale-")
    path = os.path.join(directory, "bank.index.json")
    try:
        bank = CompressedMemoryBank(V, t, FP)
        bank.extend([f"{i:x}" for i in range(n)], zipf_codes(n, t, seed, exponent))
        start = time.perf_counter()
        bank.save(path)
        save_s = time.perf_counter() - start
        disk = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
                   if not f.endswith(".lock"))
        del bank
        start = time.perf_counter()
        bank = CompressedMemoryBank.load(path)
        load_s = time.perf_counter() - start
        new = [f"new-{i:x}" for i in range(1000)]
        start = time.perf_counter()
        bank.extend(new, zipf_codes(1000, t, seed + 1, exponent))
        bank.save(path)
        append_s = time.perf_counter() - start
        start = time.perf_counter()
        index = CodeIndex(bank.codes, V)
        index_s = time.perf_counter() - start
        df = index.document_frequency()  # documents (with multiplicity) per code
        idf = np.maximum(np.log((len(bank) + 1) / (df + 0.5)), 0)  # a code in nearly every row weighs 0
        questions_weights = []
        for q in zipf_codes(questions, 10, seed + 2, exponent):
            weights = torch.zeros(1, V, dtype=torch.float64)
            q = q.unique()
            weights[0, q] = torch.round(torch.from_numpy(idf[q.numpy()]) * 2 ** 20) / 2 ** 20
            questions_weights.append(weights)
        latency, exact = latencies(index, questions_weights, None)
        row = {"docs": n, "bytes_per_doc": disk / n, "save_s": save_s, "append_s": append_s, "load_s": load_s,
               "index_build_s": index_s, "query_ms_p50": statistics.median(latency),
               "query_ms_p95": statistics.quantiles(latency, n=20)[18]}
        if max_postings:
            latency, approx = latencies(index, questions_weights, max_postings)
            row.update({"approx_query_ms_p50": statistics.median(latency),
                        "approx_query_ms_p95": statistics.quantiles(latency, n=20)[18],
                        "approx_recall": float(np.mean([len(set(a[1][0].tolist()) & set(e[1][0].tolist())) / 3
                                                        for a, e in zip(approx, exact)])),
                        "approx_same_scores": float(np.mean([torch.equal(a[0], e[0])
                                                             for a, e in zip(approx, exact)]))})
        row["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        queue.put(row)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def rss_mb() -> float:
    """Current resident set size of this process, MiB (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def key_size(n: int, questions: int, seed: int, queue) -> None:
    """Latency of the compact key's index at n random keys (run in its own process, one thread)."""
    import faiss

    from mbc_hf.compact_key import EXACT_MAX_DOCS, KEY_BYTES, KeyIndex

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(seed)
    keys = torch.from_numpy(rng.integers(0, 256, (n, KEY_BYTES), dtype=np.uint8))
    queries = torch.from_numpy(rng.integers(0, 256, (questions, KEY_BYTES), dtype=np.uint8))
    before = rss_mb()
    start = time.perf_counter()
    index = KeyIndex()
    for part in keys.chunk(10):  # appended as a growing bank would be
        index.add(part)
    build_s = time.perf_counter() - start
    index_mb = rss_mb() - before

    def timed(ix, k):
        ms, rows = [], []
        for q in queries.split(1):
            t = time.perf_counter()
            rows.append(ix.search(q, k)[1])
            ms.append((time.perf_counter() - t) * 1000)
        return ms, torch.cat(rows)

    ms, found = timed(index, 64)
    row = {"docs": n, "index": index.description, "build_s": build_s, "index_ram_mb": index_mb,
           "key_bytes_mb": n * KEY_BYTES / 2 ** 20, "query_ms_p50": statistics.median(ms),
           "query_ms_p95": statistics.quantiles(ms, n=20)[18]}
    if not index.exact:
        del index
        flat = KeyIndex(exact_max_docs=n)
        flat.add(keys)
        exact_ms, exact = timed(flat, 64)
        row.update({"exact_query_ms_p50": statistics.median(exact_ms),
                    "recall_at_10": float(np.mean([len(set(a[:10].tolist()) & set(e[:10].tolist())) / 10
                                                   for a, e in zip(found, exact)])),
                    "exact_max_docs": EXACT_MAX_DOCS})
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(row)


def main_key(a) -> None:
    ctx = multiprocessing.get_context("spawn")
    sizes = []
    for n in a.docs:
        queue = ctx.Queue()
        proc = ctx.Process(target=key_size, args=(n, a.questions, a.seed, queue))
        proc.start()
        sizes.append(queue.get())
        proc.join()
        print(json.dumps(sizes[-1]), flush=True)
    write_json_report(a.output, {"sizes": sizes, "command": "python " + " ".join(sys.argv)})
    print(markdown_table(sizes, ["docs", "index", "build_s", "index_ram_mb", "key_bytes_mb", "query_ms_p50",
                                 "query_ms_p95"]))
    approximate = [r for r in sizes if "recall_at_10" in r]
    if approximate:
        print(markdown_table(approximate, ["docs", "query_ms_p50", "exact_query_ms_p50", "recall_at_10"]))


def end_to_end(n: int) -> dict:
    """Memorize n documents with the tiny random model, save, append 10% more, load (seconds); then `mbc-hf adapt`
    the same documents with 1 and with 2 processes (documents per second)."""
    from mbc_hf.testing import tiny_mbc_model

    model = tiny_mbc_model(codebook_type="vocabulary").eval()
    docs = [f"Document {i} is about the river number {i} and the town of {i * 7}." for i in range(n)]
    model.codebook.fit([model.tokenizer(d)["input_ids"] for d in docs])
    directory = tempfile.mkdtemp(prefix="bank-scale-e2e-")
    path = os.path.join(directory, "bank.index.json")
    try:
        start = time.perf_counter()
        bank = model.memorize(docs)
        memorize_s = time.perf_counter() - start
        start = time.perf_counter()
        bank.save(path)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        bank = model.memorize([d + " More." for d in docs[: n // 10]], memory_bank=bank)
        bank.save(path)
        append_s = time.perf_counter() - start
        start = time.perf_counter()
        loaded = CompressedMemoryBank.load(path, codebook_fingerprint=model.codebook.fingerprint())
        load_s = time.perf_counter() - start
        assert len(loaded) == len(bank)
        # `mbc-hf adapt` in 1 and 2 processes on the same documents (process start and model loading included)
        from mbc_hf.cli import main as cli

        model.save_pretrained(os.path.join(directory, "model"))
        docs_file = os.path.join(directory, "docs.txt")
        with open(docs_file, "w") as fh:
            fh.write("\n".join(docs) + "\n")
        adapt_s = {}
        for procs in (1, 2):
            start = time.perf_counter()
            cli(["adapt", "--model", os.path.join(directory, "model"), "--documents", docs_file, "--bank",
                 os.path.join(directory, f"adapt{procs}.index.json"), "--num-proc", str(procs)])
            adapt_s[procs] = time.perf_counter() - start
        return {"docs": n, "memorize_ms_per_doc": memorize_s * 1000 / n, "save_s": save_s, "append_s": append_s,
                "load_s": load_s, "adapt_docs_per_s_1proc": n / adapt_s[1], "adapt_docs_per_s_2proc": n / adapt_s[2],
                "adapt_speedup_2proc": adapt_s[1] / adapt_s[2]}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--num-tokens", type=int, default=12, help="T codes per document")
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--end-to-end-docs", type=int, default=20000, help="0 skips the tiny-model part")
    p.add_argument("--zipf", type=float, default=1.0, help="exponent of the code distribution (0: uniform codes, "
                   "the best case for an inverted index; 1: word-frequency-like, long posting lists)")
    p.add_argument("--max-postings", type=int, default=None, help="also time the approximate search that reads at "
                   "most L postings per question token, and measure its recall against the exact ranking")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--key", action="store_true", help="measure the compact key's FAISS index instead (issue 36)")
    p.add_argument("--output", default="benchmarks/results/scale.json")
    a = p.parse_args()
    if a.key:
        return main_key(a)
    ctx = multiprocessing.get_context("spawn")
    sizes = []
    for n in a.docs:
        queue = ctx.Queue()
        proc = ctx.Process(target=one_size, args=(n, a.num_tokens, a.questions, a.seed, a.zipf, a.max_postings,
                                                       queue))
        proc.start()
        row = queue.get()
        proc.join()
        sizes.append(row)
        print(json.dumps(row), flush=True)
    base = sizes[0]
    for row in sizes:
        row["append_over_save"] = row["append_s"] / row["save_s"]
        row["p50_over_smallest"] = row["query_ms_p50"] / base["query_ms_p50"]
        if a.max_postings:
            row["approx_p50_over_smallest"] = row["approx_query_ms_p50"] / base["approx_query_ms_p50"]
    record = {"num_tokens": a.num_tokens, "vocab_size": V, "zipf_exponent": a.zipf, "max_postings": a.max_postings,
              "sizes": sizes,
              "end_to_end": end_to_end(a.end_to_end_docs) if a.end_to_end_docs else None,
              "command": "python " + " ".join(sys.argv)}
    write_json_report(a.output, record)
    print(markdown_table(sizes, ["docs", "bytes_per_doc", "save_s", "append_s", "append_over_save", "load_s",
                                 "index_build_s", "rss_mb", "query_ms_p50", "query_ms_p95", "p50_over_smallest"]))
    if a.max_postings:
        print(markdown_table(sizes, ["docs", "query_ms_p50", "approx_query_ms_p50", "approx_query_ms_p95",
                                     "approx_p50_over_smallest", "approx_recall", "approx_same_scores"]))
    if record["end_to_end"]:
        print(markdown_table([record["end_to_end"]], list(record["end_to_end"])))
    assert math.isfinite(base["query_ms_p50"])


if __name__ == "__main__":
    main()

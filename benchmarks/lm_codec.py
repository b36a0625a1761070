"""Documents stored as arithmetic codes under the frozen LM (issue 38, item 1 "Measure first"): bytes per document,
encode / decode time, peak RSS and whether decoding is bit-exact.

Each document's LM tokens are range-coded (`constriction.stream.queue.RangeEncoder`, 32-bit words, 64-bit state)
with the embedded SmolLM2-135M-Instruct's next-token distribution, one token at a time after a start token
(``<|endoftext|>``, not stored). A stored document (a "record") is::

    2-byte token count (big-endian) | 4-byte CRC32 of the token ids (--check-bytes 4; 0 leaves it out) | code

and the code is the range coder's emitted words (big-endian) followed by the shortest point of its final interval,
trailing zero bytes dropped (the decoder pads zeros back; constriction's own seal always writes a whole word).

Probabilities -> integer frequencies: the LM's float32 logits of a step are cast to float64, ``p = exp(l - max l)``
in NumPy, and ``constriction.stream.model.Categorical(p, perfect=False)`` turns them into the coder's fixed-point
frequencies (24-bit; every token keeps a nonzero frequency, so any token sequence can be coded). That map is
deterministic: bit-identical float32 logits give bit-identical frequencies on both sides. Decoding is therefore
exact exactly when the decoder's LM forward reproduces the encoder's logits bit for bit, so the encoder computes
them the way the decoder must: one LM step per token with ``past_key_values`` (incremental), documents stepped
together in batches of ``--batch-size`` documents of similar length, the LM always run with ``--layout-rows`` rows
(a finished or missing row is fed the start token until the batch ends). The
table tests which changes of that layout keep decoding exact: batch size 1 vs 8, 1 vs 2 torch threads, a
save/load round trip of the records (safetensors: one uint8 blob plus offsets), and an encoder that takes the
logits of one parallel forward over the whole document (the fast way to encode) instead.

Baselines per document: UTF-8 bytes, ``xz -9`` of the document alone (`lzma.compress(preset=9)`, .xz container
included), the ideal code length ``sum(-log2 p(token | prefix)) / 8 + 2`` under the same quantization-free
float64 softmax, and the default MBC bank's 96 bytes (T = 48 uint16 codes).

Timings are `time.perf_counter` wall time of the LM forward and the coder together (tokenization and
detokenization not included); peak RSS is ``ru_maxrss`` of this process (torch + transformers + the fp32 model
included). Run it with one thread (``OMP_NUM_THREADS=1``); the 2-thread rows switch with ``torch.set_num_threads``.

    OMP_NUM_THREADS=1 python benchmarks/lm_codec.py --docs 300 --output benchmarks/results/lm_codec.json
"""

import argparse
import copy
import lzma
import os
import platform
import resource
import sys
import tempfile
import time
import zlib
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from mbc_hf.demo import markdown_table, write_json_report  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "squad",
                    "dev.minus-holdout.paragraphs.jsonl")
BANK_T48_BYTES = 96  # the default bank: T = 48 codes of 2 bytes (issue 38)


def _constriction():
    import constriction  # the `bench` / `test` extras

    return constriction


# ---------------------------------------------------------------------------------------------------- the coder

def frequencies_input(logits: torch.Tensor) -> np.ndarray:
    """One step's float32 logits (V,) -> the float64 weights handed to ``Categorical(..., perfect=False)``."""
    x = logits.detach().to(torch.float32).numpy().astype(np.float64)
    return np.exp(x - x.max())


def _categorical(weights: np.ndarray):
    return _constriction().stream.model.Categorical(weights, lazy=True, perfect=False)


def _trimmed_code(encoder) -> bytes:
    """The encoder's data as bytes, sealed with the shortest point of its final interval (instead of constriction's
    whole seal word), trailing zero bytes dropped."""
    position, (lower, size) = encoder.pos()
    words = encoder.get_compressed()[:position]
    upper = min(lower + size, 1 << 64)  # a point past 2^64 would carry into the emitted words: not used
    for zeros in range(8, -1, -1):
        step = 1 << (8 * zeros)
        point = -(-lower // step) * step
        if point < upper:
            break
    return (words.astype(">u4").tobytes() + point.to_bytes(8, "big")).rstrip(b"\0")


def _code_words(code: bytes) -> np.ndarray:
    code = code + b"\0" * (-len(code) % 4)
    return np.frombuffer(code, dtype=">u4").astype(np.uint32)


def checksum(ids, nbytes: int) -> bytes:
    """The first ``nbytes`` (0-4) of the big-endian CRC32 of the token ids as little-endian uint32."""
    if not nbytes:
        return b""
    return zlib.crc32(np.asarray(ids, dtype="<u4").tobytes()).to_bytes(4, "big")[:nbytes]


class LMCodec:
    """Range coding of token ids under a causal LM's next-token distribution (see the module docstring).

    Args:
        model: a causal LM in eval mode (float32 on CPU here). tokenizer: its tokenizer.
        start_id: the token every document is conditioned on first (not stored).
        check_bytes: bytes of the token ids' CRC32 stored per record (0-4), checked after decoding.
        layout_rows: the LM is always stepped with exactly this many rows (documents of a batch, then dummy rows
            fed the start token), so a document gets the same logits whichever documents share its batch; None:
            as many rows as the batch has documents.
    """

    def __init__(self, model, tokenizer, start_id: int, check_bytes: int = 4, layout_rows: int | None = None):
        if not 0 <= check_bytes <= 4:
            raise ValueError(f"check_bytes={check_bytes}: 0 to 4")
        self.model, self.tokenizer, self.start_id, self.check_bytes = model, tokenizer, start_id, check_bytes
        self.layout_rows = layout_rows
        self.header_bytes = 2 + check_bytes

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        ids = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        for i, row in enumerate(ids):
            if len(row) > 0xFFFF:
                raise ValueError(f"document {i} has {len(row)} tokens: the 2-byte length holds at most 65,535")
        return ids

    def detokenize(self, ids: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @torch.inference_mode()
    def _steps(self, lengths: list[int], choose) -> None:
        """Step the LM over ``len(lengths)`` documents at once; ``choose(row, t, logits)`` returns row's token t.
        The encoder and the decoder both run through here, so they compute the same logits the same way."""
        if self.layout_rows is not None:
            if len(lengths) > self.layout_rows:
                raise ValueError(f"{len(lengths)} documents in a batch of layout_rows={self.layout_rows}")
            lengths = list(lengths) + [0] * (self.layout_rows - len(lengths))
        rows, inputs, cache = len(lengths), torch.full((len(lengths), 1), self.start_id), None
        for t in range(max(lengths, default=0)):
            out = self.model(input_ids=inputs, past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1, :]
            inputs = torch.tensor([[choose(r, t, logits[r]) if t < lengths[r] else self.start_id]
                                   for r in range(rows)])

    def _record(self, ids, encoder) -> bytes:
        return len(ids).to_bytes(2, "big") + checksum(ids, self.check_bytes) + _trimmed_code(encoder)

    def encode(self, ids: list[list[int]], batch_size: int = 8) -> tuple[list[bytes], list[float]]:
        """Token ids -> (one record per document, ideal code length in bits per document)."""
        records, ideal = [], []
        for lo in range(0, len(ids), batch_size):
            batch = ids[lo:lo + batch_size]
            encoders = [_constriction().stream.queue.RangeEncoder() for _ in batch]
            bits = [0.0] * len(batch)

            def choose(r, t, logits, batch=batch, encoders=encoders, bits=bits):
                weights, token = frequencies_input(logits), batch[r][t]
                encoders[r].encode(token, _categorical(weights))
                bits[r] -= np.log2(weights[token] / weights.sum())
                return token

            self._steps([len(x) for x in batch], choose)
            records += [self._record(x, e) for x, e in zip(batch, encoders)]
            ideal += bits
        return records, ideal

    @torch.inference_mode()
    def encode_parallel(self, ids: list[list[int]]) -> list[bytes]:
        """The fast encoder: every step's logits from one forward over ``start + document`` (not what the decoder
        computes: the table reports whether its records decode)."""
        records = []
        for x in ids:
            logits = self.model(input_ids=torch.tensor([[self.start_id] + list(x[:-1])])).logits[0] if x else None
            encoder = _constriction().stream.queue.RangeEncoder()
            for t, token in enumerate(x):
                encoder.encode(token, _categorical(frequencies_input(logits[t])))
            records.append(self._record(x, encoder))
        return records

    def parse(self, record: bytes) -> tuple[int, bytes, bytes]:
        if len(record) < self.header_bytes:
            raise ValueError(f"record of {len(record)} bytes: shorter than its {self.header_bytes}-byte header")
        return (int.from_bytes(record[:2], "big"), record[2:self.header_bytes], record[self.header_bytes:])

    def decode(self, records: list[bytes], batch_size: int = 8) -> tuple[list[list[int]], list[bool]]:
        """Records -> (token ids per document, whether each one's stored checksum matches its decoded ids).

        A corrupted record decodes to other tokens, or to a code the coder finds invalid (its row stops there and
        returns fewer tokens); either way it is flagged (the checksum, or the invalid code)."""
        out, ok = [], []
        for lo in range(0, len(records), batch_size):
            parsed = [self.parse(r) for r in records[lo:lo + batch_size]]
            decoders = [_constriction().stream.queue.RangeDecoder(_code_words(code)) for _, _, code in parsed]
            decoded, invalid = [[] for _ in parsed], [False] * len(parsed)

            def choose(r, t, logits, decoders=decoders, decoded=decoded, invalid=invalid):
                if invalid[r]:
                    return self.start_id
                try:
                    decoded[r].append(int(decoders[r].decode(_categorical(frequencies_input(logits)))))
                except AssertionError:  # constriction: "compressed data that is invalid for the entropy model"
                    invalid[r] = True
                    return self.start_id
                return decoded[r][-1]

            self._steps([n for n, _, _ in parsed], choose)
            out += decoded
            ok += [not bad and checksum(ids, self.check_bytes) == check
                   for ids, bad, (_, check, _) in zip(decoded, invalid, parsed)]
        return out, ok


def save_records(path, records: list[bytes]) -> None:
    """Variable-length records as one safetensors file: a uint8 blob and int64 end offsets."""
    from safetensors.numpy import save_file

    blob = np.frombuffer(b"".join(records), dtype=np.uint8).copy()
    save_file({"blob": blob, "ends": np.cumsum([len(r) for r in records], dtype=np.int64)}, str(path))


def load_records(path) -> list[bytes]:
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    blob, ends = tensors["blob"].tobytes(), tensors["ends"].tolist()
    return [blob[a:b] for a, b in zip([0] + ends[:-1], ends)]


# ---------------------------------------------------------------------------------------------------- benchmark

def load_documents(path: str, n: int) -> tuple[list[str], list[str]]:
    """The first ``n`` unique documents of a QA file in file order: (doc ids, texts)."""
    from mbc_hf.data import load_qa_file

    ds = load_qa_file(path, downsample_to=n)
    ids, texts, seen = [], [], set()
    for doc_id, text in zip(ds["doc_id"], ds["context"]):
        if doc_id not in seen:
            seen.add(doc_id)
            ids.append(doc_id)
            texts.append(text)
    return ids, texts


def load_lm(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "embedded":
        from mbc_hf.embedded import embedded_base_model_path

        name = embedded_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    return model, tokenizer, name


def start_token(tokenizer) -> int:
    """``<|endoftext|>`` where the vocabulary has it (SmolLM2's document separator), else BOS, else EOS."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return vocab["<|endoftext|>"]
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def timed_decode(codec, records, ids, doc_ids, index, batch_size, threads, label) -> dict:
    """Decode ``records[i] for i in index`` in that order, in batches of ``batch_size``, with ``threads`` torch
    threads; compare with the original token ids."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    decoded, ok = codec.decode([records[i] for i in index], batch_size=batch_size)
    seconds = time.perf_counter() - start
    torch.set_num_threads(1)
    bad = []
    for i, got in zip(index, decoded):
        if got != ids[i]:
            first = next((t for t, (a, b) in enumerate(zip(got, ids[i])) if a != b), min(len(got), len(ids[i])))
            bad.append({"doc": i, "doc_id": doc_ids[i], "first_wrong_token": first})
    flagged = sorted(i for i, good in zip(index, ok) if not good)
    return {"row": label, "docs": len(index), "batch": batch_size, "threads": threads,
            "rows": codec.layout_rows or f"<={batch_size}", "decode ms/doc": 1000 * seconds / max(len(index), 1),
            "decode ms/batch": 1000 * seconds / max(1, -(-len(index) // batch_size)),
            "exact": f"{len(index) - len(bad)}/{len(index)}", "mismatched_docs": bad, "checksum_failures": flagged,
            "checksum_catches_all": flagged == sorted(b["doc"] for b in bad)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=DATA, help="QA file (default: the shared SQuAD dev paragraphs)")
    p.add_argument("--docs", type=int, default=300, help="first N unique documents (default 300; 1665 = the stream)")
    p.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct) or a model folder")
    p.add_argument("--batch-size", type=int, default=8, help="documents stepped together (encoder and main decode)")
    p.add_argument("--layout-rows", type=int, default=8,
                   help="LM rows every step runs with, dummy rows padding a short batch (0: as many as documents)")
    p.add_argument("--check-bytes", type=int, default=4, help="CRC32 bytes per record (0-4)")
    p.add_argument("--latency-docs", type=int, default=8, help="documents decoded one at a time (batch 1)")
    p.add_argument("--cross-docs", type=int, default=8,
                   help="documents decoded with 2 threads (batch 8 and batch 1) and encoded by the parallel forward")
    p.add_argument("--output", default=None, help="JSON report (default: print only)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    threads0, loadavg = torch.get_num_threads(), [round(x, 2) for x in os.getloadavg()]
    torch.set_num_threads(1)
    doc_ids, texts = load_documents(args.data, args.docs)
    model, tokenizer, model_path = load_lm(args.model)
    codec = LMCodec(model, tokenizer, start_token(tokenizer), check_bytes=args.check_bytes,
                    layout_rows=args.layout_rows or None)
    ids = codec.tokenize(texts)
    round_trip_text = sum(t == d for t, d in zip(texts, codec.detokenize(ids)))
    utf8 = [len(t.encode("utf-8")) for t in texts]
    xz = [len(lzma.compress(t.encode("utf-8"), preset=9)) for t in texts]
    rss_loaded = peak_rss_mib()

    # batches of documents of similar length (the decoder reads the lengths first), so few rows idle
    by_length = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    start = time.perf_counter()
    coded_sorted, bits_sorted = codec.encode([ids[i] for i in by_length], batch_size=args.batch_size)
    encode_ms = 1000 * (time.perf_counter() - start) / len(ids)
    records, ideal_bits = [b""] * len(ids), [0.0] * len(ids)
    for k, i in enumerate(by_length):
        records[i], ideal_bits[i] = coded_sorted[k], bits_sorted[k]

    with tempfile.TemporaryDirectory() as tmp:  # the save/load round trip every decode below reads from
        save_records(os.path.join(tmp, "records.safetensors"), records)
        file_bytes = os.path.getsize(os.path.join(tmp, "records.safetensors"))
        loaded = load_records(os.path.join(tmp, "records.safetensors"))
    assert loaded == records, "safetensors round trip changed the records"

    n_tok = [len(x) for x in ids]
    rec = [len(r) for r in records]
    mean = lambda xs: float(np.mean(xs)) if len(xs) else float("nan")  # noqa: E731
    bpb = lambda b: 8 * b / mean(utf8)  # noqa: E731
    ideal = [b / 8 + 2 for b in ideal_bits]
    rows = [
        {"row": "UTF-8 text", "docs": len(ids), "bytes/doc": mean(utf8), "bits/byte": 8.0, "exact": "yes"},
        {"row": "xz -9, each document alone", "docs": len(ids), "bytes/doc": mean(xz), "bits/byte": bpb(mean(xz)),
         "exact": "yes"},
        {"row": "MBC bank, T = 48 codes (lossy)", "docs": len(ids), "bytes/doc": float(BANK_T48_BYTES),
         "bits/byte": bpb(BANK_T48_BYTES), "exact": "no"},
        {"row": "ideal: sum -log2 p / 8 + 2-byte length", "docs": len(ids), "bytes/doc": mean(ideal),
         "bits/byte": bpb(mean(ideal))},
        {"row": "LM range code + 2-byte length", "docs": len(ids),
         "bytes/doc": mean(rec) - args.check_bytes, "bits/byte": bpb(mean(rec) - args.check_bytes)},
    ]
    coded = {"row": f"  + {args.check_bytes}-byte CRC32 = stored record", "docs": len(ids), "bytes/doc": mean(rec),
             "bits/byte": bpb(mean(rec)), "encode ms/doc": encode_ms, "batch": args.batch_size, "threads": 1,
             "row_note": "decoded after a safetensors save/load round trip"}
    B, n = args.batch_size, len(ids)
    main_decode = timed_decode(codec, loaded, ids, doc_ids, by_length, B, 1, f"decode after save/load, batch {B}")
    coded.update({k: main_decode[k] for k in ("decode ms/doc", "exact", "rows")})
    rows.append(coded)
    checks = [main_decode]
    lat, cross = list(range(min(args.latency_docs, n))), list(range(min(args.cross_docs, n)))
    one_row = copy.copy(codec)
    one_row.layout_rows = None  # the LM stepped with as many rows as documents: 1 for a document alone
    if lat:  # one addressed document, in the fixed layout
        checks.append(timed_decode(codec, loaded, ids, doc_ids, lat, 1, 1, "one document at a time"))
    if cross:
        shifted = list(range(min(B // 2, n - 1), min(B // 2 + len(cross), n)))[::-1]
        checks.append(timed_decode(codec, loaded, ids, doc_ids, shifted, B, 1,
                                   "other batch companions (shifted by B/2, reversed)"))
        checks.append(timed_decode(codec, loaded, ids, doc_ids, cross, B, 2, f"batch {B}, 2 threads"))
    if lat:  # batch 1 vs B for the probability computation
        checks.append(timed_decode(one_row, loaded, ids, doc_ids, lat, 1, 1,
                                   f"one document at a time, 1 LM row (encoded with {codec.layout_rows or B})"))
        start = time.perf_counter()  # the 1-row layout end to end: encode and decode each document alone
        alone, _ = one_row.encode([ids[i] for i in lat], batch_size=1)
        alone_ms = 1000 * (time.perf_counter() - start) / len(lat)
        alone = {i: r for i, r in zip(lat, alone)}
        row = timed_decode(one_row, alone, ids, doc_ids, lat, 1, 1, "1-row layout: encoded and decoded alone")
        row["encode ms/doc"] = alone_ms
        checks.append(row)
        checks.append(timed_decode(one_row, alone, ids, doc_ids, lat[:max(1, len(lat) // 2)], 1, 2,
                                   "1-row layout, decoded with 2 threads"))
    if cross:  # the fast encoder: one parallel forward per document
        start = time.perf_counter()
        fast = codec.encode_parallel([ids[i] for i in cross])
        fast_ms = 1000 * (time.perf_counter() - start) / len(cross)
        fast_row = timed_decode(codec, dict(zip(cross, fast)), ids, doc_ids, cross, B, 1,
                                "parallel-forward encoder")
        fast_row.update({"encode ms/doc": fast_ms, "bytes/doc": mean([len(r) for r in fast]),
                         "records_identical": f"{sum(fast[k] == records[i] for k, i in enumerate(cross))}/"
                                              f"{len(cross)}"})
        checks.append(fast_row)
    torch.set_num_threads(threads0)
    rows += [{k: v for k, v in c.items() if k in ("docs", "batch", "threads", "rows", "encode ms/doc", "bytes/doc",
                                                   "decode ms/doc", "exact")} | {"row": "  " + c["row"]}
             for c in checks[1:]]

    columns = ["row", "docs", "bytes/doc", "bits/byte", "encode ms/doc", "decode ms/doc", "batch", "rows",
               "threads", "exact"]
    table = markdown_table(rows, columns)
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python " + " ".join(
        [os.path.relpath(__file__, os.getcwd())] + (sys.argv[1:] if argv is None else list(argv)))
    single = checks[1] if lat else None
    record = {
        "command": command, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
        "model_path": model_path, "data": args.data, "n_docs": len(ids), "start_token_id": codec.start_id,
        "check_bytes": args.check_bytes, "table": table, "rows": rows, "decode_checks": checks,
        "summary": {
            "tokens_per_doc": mean(n_tok), "utf8_bytes_per_doc": mean(utf8), "xz9_bytes_per_doc": mean(xz),
            "ideal_bytes_per_doc": mean(ideal), "record_bytes_per_doc": mean(rec),
            "record_bytes_per_doc_without_crc": mean(rec) - args.check_bytes,
            "code_overhead_bytes_per_doc": mean(rec) - args.check_bytes - mean(ideal),
            "max_record_bytes": max(rec, default=0), "safetensors_file_bytes": file_bytes,
            "encode_ms_per_doc": encode_ms, "decode_ms_per_doc_batched": main_decode["decode ms/doc"],
            "decode_ms_one_document": single["decode ms/doc"] if single else None,
            "exact_configurations": {c["row"]: c["exact"] for c in checks},
            "detokenize_equals_text": f"{round_trip_text}/{len(ids)}",
            "peak_rss_mib": peak_rss_mib(), "rss_after_load_mib": rss_loaded,
        },
        "per_doc": {"doc_id": doc_ids, "tokens": n_tok, "utf8": utf8, "xz9": xz, "record": rec,
                    "ideal_bits": [round(b, 3) for b in ideal_bits]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": _version("transformers"), "constriction": _version("constriction"),
                     "numpy": np.__version__, "mbc-hf": _version("mbc-hf")},
        "loadavg_start": loadavg, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(table)
    print(f"\n{command}\nrecords: {mean(rec):.1f} bytes/doc ({args.check_bytes}-byte CRC included), ideal "
          f"{mean(ideal):.1f}, {mean(n_tok):.1f} tokens/doc; peak RSS {record['summary']['peak_rss_mib']:.0f} MiB; "
          f"detokenized == text for {round_trip_text}/{len(ids)} documents")
    for c in checks:
        if c["mismatched_docs"]:
            print(f"NOT EXACT ({c['row']}): {c['mismatched_docs']}")
    if args.output:
        write_json_report(args.output, record)
    return record


if __name__ == "__main__":
    main()

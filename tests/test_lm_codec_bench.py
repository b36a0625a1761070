"""benchmarks/lm_codec.py's coder on a tiny random LM (no downloads): documents range-coded under the LM's
next-token distribution decode to the same token ids, in any batch layout of the same width and after a safetensors
round trip, and a corrupted byte never decodes silently to other tokens (the stored CRC32 catches it)."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("constriction")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_codec.py"
TEXTS = ["The cat sat on the mat.", "Paris is the capital of France. Water boils at 100 degrees.",
         "", "Zürich — 3 × 4 = 12 ✓ unseen words: quixotic zephyr", "the quick brown fox jumps over the lazy dog"]


def load_bench():
    spec = importlib.util.spec_from_file_location("lm_codec", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def codec_parts():
    from transformers import AutoModelForCausalLM

    from mbc_hf.testing import tiny_lm_config, tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_lm_config("llama", len(tok), tok.pad_token_id, tok.bos_token_id,
                                                         tok.eos_token_id)).eval()
    with torch.no_grad():  # sharper than the random init's near-uniform logits, so the code is much shorter
        lm.lm_head.weight.mul_(50)
    return load_bench(), lm, tok


def test_round_trip_is_exact_across_batches_and_save_load(codec_parts, tmp_path):
    bench, lm, tok = codec_parts
    codec = bench.LMCodec(lm, tok, bench.start_token(tok), check_bytes=4, layout_rows=3)
    ids = codec.tokenize(TEXTS)
    assert codec.detokenize(ids) == TEXTS and ids[2] == []
    records, ideal_bits = codec.encode(ids, batch_size=3)
    assert len(records) == len(TEXTS)
    for r, x, bits in zip(records, ids, ideal_bits):
        assert r[:2] == len(x).to_bytes(2, "big") and r[2:6] == bench.checksum(x, 4)
        assert len(r) - 6 <= bits / 8 + 4  # within a few bytes of the ideal code length
    bench.save_records(tmp_path / "r.safetensors", records)
    loaded = bench.load_records(tmp_path / "r.safetensors")
    assert loaded == records
    for batch in (3, 2, 1):  # other companions and fewer documents per batch: the same 3-row layout
        decoded, ok = codec.decode(loaded, batch_size=batch)
        assert decoded == ids and all(ok)
    assert codec.detokenize(codec.decode(loaded[::-1], batch_size=3)[0]) == TEXTS[::-1]


def test_a_corrupted_byte_never_decodes_silently(codec_parts):
    bench, lm, tok = codec_parts
    codec = bench.LMCodec(lm, tok, bench.start_token(tok), check_bytes=4, layout_rows=1)
    ids = codec.tokenize(TEXTS[1:2])
    (record,), _ = codec.encode(ids, batch_size=1)
    changed = 0
    for pos in range(len(record)):  # every byte of the record: length, CRC32 and code
        bad = bytearray(record)
        bad[pos] ^= 0x01 if pos == 0 else 0x5A  # (a length 23,000 tokens longer would just take long)
        (decoded,), (ok,) = codec.decode([bytes(bad)], batch_size=1)
        assert not ok or decoded == ids[0], pos  # other tokens are always flagged
        changed += decoded != ids[0]
        if pos < 6:  # a wrong length or checksum is flagged
            assert not ok
    assert changed >= len(record) - 6 - 1  # a flipped code byte changes the tokens (the last may be harmless)
    with pytest.raises(ValueError, match="header"):
        codec.decode([record[:3]])

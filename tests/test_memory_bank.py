"""Tests for mbc_hf.memory_bank (no model needed; random codes)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import safetensors.torch
import torch

from mbc_hf.memory_bank import CompressedMemoryBank, DenseMemoryBank

K, T, FP = 512, 8, "sha256:codebook-a"


def rand_codes(n: int, k: int = K, t: int = T, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (n, t), generator=g)


def brute_counts(bank: CompressedMemoryBank) -> torch.Tensor:
    counts = torch.zeros(bank.codebook_size, dtype=torch.long)
    for row in bank.codes.long().tolist():
        for c in row:
            counts[c] += 1
    return counts


def make_bank(n: int = 10, k: int = K, seed: int = 0) -> CompressedMemoryBank:
    bank = CompressedMemoryBank(k, T, FP)
    meta = [{"timestamp": i, "title": f"doc {i}"} for i in range(n)]
    bank.extend([f"d{i}" for i in range(n)], rand_codes(n, k, seed=seed), meta)
    return bank


def tmp_files(directory) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p.endswith(".tmp"))


# ---------------------------------------------------------------- dtype / size


@pytest.mark.parametrize(
    "k,dtype",
    [(1, torch.uint8), (256, torch.uint8), (257, torch.uint16), (512, torch.uint16), (65536, torch.uint16)],
)
def test_dtype_choice(k, dtype):
    bank = CompressedMemoryBank(k, T, FP)
    assert bank.dtype == dtype and bank.codes.dtype == dtype and bank.codes.shape == (0, T)


@pytest.mark.parametrize("k", [70000, 0, -3])
def test_bad_codebook_size(k):
    with pytest.raises(ValueError):
        CompressedMemoryBank(k, T, FP)


def test_extend_append_len_nbytes():
    bank = CompressedMemoryBank(256, T, FP)
    assert len(bank) == 0 and bank.nbytes == 0
    rows = bank.extend(["a", "bb"], rand_codes(2, 256))
    assert rows == [0, 1]
    assert bank.append("ccc", rand_codes(1, 256, seed=1)[0]) == 2
    assert bank.append("é", rand_codes(1, 256, seed=2)[0], metadata={"title": "x"}) == 3
    assert len(bank) == 4 and "bb" in bank and "zz" not in bank
    assert bank.doc_ids == ["a", "bb", "ccc", "é"]
    # uint8: T bytes per doc + UTF-8 id bytes (é is 2 bytes)
    assert bank.nbytes == 4 * T * 1 + (1 + 2 + 3 + 2)
    assert bank.codes.shape == (4, T) and bank.codes.dtype == torch.uint8
    assert torch.equal(bank.get_codes(["ccc", "a"]).long(), torch.stack([bank.codes[2], bank.codes[0]]).long())
    assert bank.get_metadata("é") == {"title": "x"} and bank.get_metadata("a") == {}
    big = CompressedMemoryBank(512, T, FP)
    big.extend(["x"], rand_codes(1))
    assert big.nbytes == T * 2 + 1
    assert "N=1" in repr(big) and "K=512" in repr(big) and "bytes/doc=17.0" in repr(big)
    with pytest.raises(KeyError, match="nope"):
        bank.get_codes(["a", "nope"])


def test_extend_validation_leaves_bank_unchanged():
    bank = make_bank(3)
    before = bank.codes.clone()
    bad = rand_codes(2)
    bad[1, 5] = K
    with pytest.raises(ValueError, match=r"code 512 at row 1 .*'n1'.*position 5"):
        bank.extend(["n0", "n1"], bad)
    with pytest.raises(ValueError, match="-1"):
        bank.extend(["n0"], torch.full((1, T), -1))
    with pytest.raises(TypeError, match="integer"):
        bank.extend(["n0"], torch.zeros(1, T))
    with pytest.raises(ValueError, match="shape"):
        bank.extend(["n0"], rand_codes(1, t=T + 1))
    with pytest.raises(ValueError, match="shape"):
        bank.extend(["n0", "n1"], rand_codes(1))
    with pytest.raises(ValueError, match="non-empty str"):
        bank.extend([""], rand_codes(1))
    with pytest.raises(ValueError, match="non-empty str"):
        bank.extend([3], rand_codes(1))
    with pytest.raises(TypeError, match="not a single str"):
        bank.extend("n0", rand_codes(1))
    with pytest.raises(TypeError, match="JSON"):
        bank.extend(["n0"], rand_codes(1), [{"t": object()}])
    with pytest.raises(ValueError, match="on_duplicate"):
        bank.extend(["n0"], rand_codes(1), on_duplicate="replace")
    assert len(bank) == 3 and torch.equal(bank.codes, before)


# ------------------------------------------------------------------ duplicates


def test_duplicate_skip():
    bank = make_bank(3)
    old = bank.get_codes(["d1"]).clone()
    new = rand_codes(3, seed=9)
    rows = bank.extend(["d1", "x", "x"], new, [{"v": 1}, {"v": 2}, {"v": 3}])
    assert rows == [3]
    assert len(bank) == 4 and torch.equal(bank.get_codes(["d1"]), old)
    assert torch.equal(bank.get_codes(["x"]).long(), new[1:2])  # first occurrence wins
    assert bank.get_metadata("x") == {"v": 2} and bank.get_metadata("d1")["title"] == "doc 1"
    assert bank.append("d0", rand_codes(1)[0]) is None


@pytest.mark.parametrize("k", [256, 512])
def test_duplicate_overwrite(k):
    bank = make_bank(3, k=k)
    snapshot = bank.codes
    snapshot_copy = snapshot.clone()
    new = rand_codes(3, k, seed=9)
    rows = bank.extend(["d1", "x", "x"], new, [{"v": 1}, {"v": 2}, {"v": 3}], on_duplicate="overwrite")
    assert rows == [1, 3, 3]
    assert len(bank) == 4
    assert torch.equal(bank.get_codes(["d1"]).long(), new[0:1])
    assert torch.equal(bank.get_codes(["x"]).long(), new[2:3])  # last occurrence wins
    assert bank.get_metadata("d1") == {"v": 1} and bank.get_metadata("x") == {"v": 3}
    assert torch.equal(snapshot, snapshot_copy)  # handed-out tensor not mutated
    assert torch.equal(bank.code_counts(), brute_counts(bank))


def test_duplicate_fail():
    bank = make_bank(3)
    with pytest.raises(ValueError, match="'d2'"):
        bank.extend(["new", "d2"], rand_codes(2), on_duplicate="fail")
    with pytest.raises(ValueError, match="'y'.*more than once"):
        bank.extend(["y", "y"], rand_codes(2), on_duplicate="fail")
    assert len(bank) == 3 and "new" not in bank and "y" not in bank


# ------------------------------------------------------------ remove / counts


def test_remove_and_code_counts():
    bank = make_bank(50, k=256)
    assert bank.code_counts().dtype == torch.long and bank.code_counts().shape == (256,)
    assert torch.equal(bank.code_counts(), brute_counts(bank))
    assert int(bank.code_counts().sum()) == 50 * T
    nbytes = bank.nbytes
    expected_ids = bank.doc_ids
    for d in ["d0", "d17", "d49"]:
        bank.remove(d)
        expected_ids.remove(d)
    assert bank.doc_ids == expected_ids and "d17" not in bank
    assert bank.nbytes == nbytes - 3 * T - (2 + 3 + 3)
    assert torch.equal(bank.code_counts(), brute_counts(bank))
    assert bank.get_metadata("d18") == {"timestamp": 18, "title": "doc 18"}
    assert bank.index_of("d18") == 16
    with pytest.raises(KeyError, match="d17"):
        bank.remove("d17")
    bank.extend(["e1", "e2"], rand_codes(2, 256, seed=3))  # incremental update of the cache
    assert torch.equal(bank.code_counts(), brute_counts(bank))
    counts = bank.code_counts()
    counts += 1  # returned tensor is a copy
    assert torch.equal(bank.code_counts(), brute_counts(bank))


def test_incremental_extend_20k_rows():
    bank = CompressedMemoryBank(1024, T, FP)
    codes = rand_codes(20_000, 1024)
    for start in range(0, 20_000, 64):
        ids = [f"doc-{i}" for i in range(start, min(start + 64, 20_000))]
        bank.extend(ids, codes[start : start + 64])
        if start % 6400 == 0:
            bank.code_counts()  # interleaved reads must not force a full rebuild
    assert len(bank) == 20_000
    assert torch.equal(bank.codes.long(), codes)
    assert torch.equal(bank.code_counts(), torch.bincount(codes.flatten(), minlength=1024))


# --------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path):
    bank = make_bank(20)
    bank.append("ünïcode id", rand_codes(1, seed=5)[0])
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = CompressedMemoryBank.load(path, codebook_fingerprint=FP)
    assert loaded.doc_ids == bank.doc_ids
    assert loaded.codes.dtype == torch.uint16 and torch.equal(loaded.codes, bank.codes)
    assert loaded.metadata == bank.metadata
    assert loaded.codebook_fingerprint == FP and loaded.codebook_size == K and loaded.num_tokens == T
    assert torch.equal(loaded.code_counts(), bank.code_counts())
    assert loaded.nbytes == bank.nbytes
    assert tmp_files(tmp_path) == []
    # the file holds only small unsigned codes (no int64)
    # format 2: codes + doc ids + metadata in the body (UTF-8 JSON), a checksum in the header
    tensors = safetensors.torch.load_file(str(path))
    assert set(tensors) == {"codes", "doc_ids", "metadata"} and tensors["codes"].dtype == torch.uint16
    assert tensors["doc_ids"].dtype == torch.uint8 and json.loads(bytes(tensors["doc_ids"].tolist())) == bank.doc_ids
    with safetensors.safe_open(str(path), "pt") as fh:
        header = fh.metadata()
    assert header["format"] == "mbc-compressed-memory-bank" and header["format_version"] == "2"
    assert "doc_ids" not in header and len(header["checksum"]) == 64


def test_save_load_empty_and_no_metadata(tmp_path):
    path = tmp_path / "empty.safetensors"
    CompressedMemoryBank(256, T, FP).save(path)
    empty = CompressedMemoryBank.load(path)
    assert len(empty) == 0 and empty.codes.shape == (0, T) and empty.codes.dtype == torch.uint8
    bank = CompressedMemoryBank(256, T, FP)
    bank.extend(["a", "b"], rand_codes(2, 256))
    bank.save(path)
    with safetensors.safe_open(str(path), "pt") as fh:
        assert "metadata" not in fh.metadata()
    assert CompressedMemoryBank.load(path).metadata == [{}, {}]


def test_save_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        make_bank(2).save(missing / "bank.safetensors")
    assert not missing.exists()


@pytest.mark.parametrize("failure", ["save_file", "replace"])
def test_atomic_save(tmp_path, monkeypatch, failure):
    path = tmp_path / "bank.safetensors"
    make_bank(5).save(path)
    original = path.read_bytes()
    bigger = make_bank(30, seed=1)

    if failure == "save_file":
        def broken_save_file(tensors, filename, metadata=None):
            with open(filename, "wb") as fh:  # partial write, then crash
                fh.write(b"\x00" * 17)
            raise OSError("disk full")
        monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    else:
        def broken_replace(src, dst):
            raise OSError("rename failed")
        monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        bigger.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert len(CompressedMemoryBank.load(path)) == 5
    assert tmp_files(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["bank.safetensors", "bank.safetensors.lock"]  # filelock keeps its file


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        CompressedMemoryBank.load(tmp_path / "absent.safetensors")


def test_load_truncated(tmp_path):
    path = tmp_path / "bank.safetensors"
    make_bank(10).save(path)
    data = path.read_bytes()
    for cut in (len(data) - 3, 40, 4, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="bank.safetensors"):
            CompressedMemoryBank.load(path)


def _reheader(data: bytes, edit) -> bytes:
    """The file ``data`` with its JSON header replaced by ``edit(header dict)`` (padded as safetensors does)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _set(path: tuple, value):
    def edit(header):
        target = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


FORGED = [
    pytest.param(lambda d, n: struct.pack("<Q", 2**40) + d[8:], "header", id="huge-header-length"),
    pytest.param(lambda d, n: struct.pack("<Q", 2**63) + d[8:], "header", id="header-length-2**63"),
    pytest.param(lambda d, n: struct.pack("<Q", 99_000_000) + d[8:], "header", id="header-beyond-file"),
    pytest.param(lambda d, n: struct.pack("<Q", n - 7) + d[8:], "", id="header-cut-inside-json"),
    pytest.param(lambda d, n: d[:8] + b"[" + d[9:], "", id="header-not-an-object"),
    pytest.param(lambda d, n: d[:8] + b"\xff" * n + d[8 + n :], "UTF-8", id="header-not-utf8"),
    pytest.param(lambda d, n: d[:8] + b" " * n + d[8 + n :], "", id="header-blank"),
    pytest.param(lambda d, n: _reheader(d, _set(("codes", "dtype"), "U32")), "shape, data type, or offset",
                 id="dtype-size-mismatch"),
    pytest.param(lambda d, n: _reheader(d, _set(("codes", "shape"), [11, T])), "shape, data type, or offset",
                 id="shape-size-mismatch"),
    pytest.param(lambda d, n: _reheader(d, _set(("codes", "data_offsets"), [0, 10**12])), "",
                 id="offsets-beyond-file"),
    pytest.param(lambda d, n: _reheader(d, _set(("__metadata__", "format"), 5)), "expected a string",
                 id="metadata-value-not-str"),
    pytest.param(lambda d, n: _reheader(d, lambda h: h.pop("codes")), "", id="tensor-entry-removed"),
    pytest.param(lambda d, n: b"\x80\x04\x95" + bytes(60), "", id="pickle-bytes"),
    pytest.param(lambda d, n: b"not a safetensors file at all, just some text\n" * 4, "", id="text-file"),
]


@pytest.mark.parametrize("forge, match", FORGED)
def test_load_forged_header(tmp_path, forge, match):
    path = tmp_path / "bank.safetensors"
    make_bank(10).save(path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(forge(data, n))
    with pytest.raises(ValueError, match="bank.safetensors: not a readable safetensors file") as info:
        CompressedMemoryBank.load(path)
    assert match in str(info.value)


def write_raw(path, codes, **overrides):
    header = {
        "format": "mbc-compressed-memory-bank",
        "format_version": "1",
        "codebook_size": "256",
        "num_tokens": str(T),
        "codebook_fingerprint": FP,
        "doc_ids": json.dumps([f"d{i}" for i in range(codes.shape[0])]),
    }
    header.update(overrides)
    header = {k: v for k, v in header.items() if v is not None}
    safetensors.torch.save_file({"codes": codes}, str(path), metadata=header)


@pytest.mark.parametrize(
    "codes,overrides,match",
    [
        (torch.full((3, T), 7, dtype=torch.uint16), {"codebook_size": "5"}, r"code 7 at row 0"),
        (torch.zeros(3, T, dtype=torch.int64), {}, "unsigned"),
        (torch.zeros(3, T, dtype=torch.float32), {}, "unsigned"),
        (torch.zeros(3, T, dtype=torch.uint8), {"doc_ids": json.dumps(["a", "b"])}, "3 rows.*2 doc_ids"),
        (torch.zeros(3, T + 1, dtype=torch.uint8), {}, "shape"),
        (torch.zeros(3, T, dtype=torch.uint8), {"doc_ids": json.dumps(["a", "b", "a"])}, "duplicate doc_id 'a'"),
        (torch.zeros(3, T, dtype=torch.uint8), {"doc_ids": "[not json"}, "doc_ids.*JSON"),
        (torch.zeros(3, T, dtype=torch.uint8), {"doc_ids": None}, "doc_ids.*missing"),
        (torch.zeros(3, T, dtype=torch.uint8), {"codebook_size": "lots"}, "codebook_size"),
        (torch.zeros(3, T, dtype=torch.uint8), {"format": "something-else"}, "format tag"),
        (torch.zeros(3, T, dtype=torch.uint8), {"format": "mbc-dense-memory-bank"}, "DenseMemoryBank.load"),
        (torch.zeros(3, T, dtype=torch.uint8), {"format_version": "3"}, "format_version"),
        (torch.zeros(3, T, dtype=torch.uint8), {"metadata": json.dumps([{}])}, "metadata"),
        (torch.zeros(3, T, dtype=torch.uint8), {"codebook_fingerprint": None}, "codebook_fingerprint"),
        (torch.zeros(3, T, dtype=torch.uint8), {"num_tokens": "08"}, "num_tokens.*positive integer"),
        (torch.zeros(3, T, dtype=torch.uint8), {"num_tokens": "-8"}, "num_tokens.*positive integer"),
        (torch.zeros(3, T, dtype=torch.uint8), {"codebook_size": "1000000"}, "codebook_size 1000000 > 65536"),
        (torch.zeros(3, T, dtype=torch.int8), {}, "unsigned"),
        (torch.zeros(3, T, dtype=torch.uint8), {"doc_ids": json.dumps(["a", "b", 3])}, "doc_ids.*non-empty str"),
        (torch.zeros(3, T, dtype=torch.uint8), {"doc_ids": json.dumps({"a": 1})}, "doc_ids.*JSON list"),
        (torch.zeros(3, T, dtype=torch.uint8), {"metadata": json.dumps([{}, {}, []])}, "metadata.*list of objects"),
        (torch.zeros(3, T, dtype=torch.uint8), {"metadata": "{oops"}, "metadata.*not valid JSON"),
    ],
)
def test_load_rejects_bad_files(tmp_path, codes, overrides, match):
    path = tmp_path / "raw.safetensors"
    write_raw(path, codes, **overrides)
    with pytest.raises(ValueError, match=match) as info:
        CompressedMemoryBank.load(path)
    assert "raw.safetensors" in str(info.value)


def test_load_accepts_wider_unsigned_dtype(tmp_path):
    path = tmp_path / "raw.safetensors"
    write_raw(path, torch.full((2, T), 255, dtype=torch.uint16))
    bank = CompressedMemoryBank.load(path)
    assert bank.codes.dtype == torch.uint8 and int(bank.codes.long().max()) == 255


def test_load_without_header_or_with_extra_tensor(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"codes": torch.zeros(1, T, dtype=torch.uint8)}, str(path))
    with pytest.raises(ValueError, match="plain.safetensors"):
        CompressedMemoryBank.load(path)
    header = {"format": "mbc-compressed-memory-bank", "format_version": "1", "codebook_size": "256",
              "num_tokens": str(T), "codebook_fingerprint": FP, "doc_ids": '["a"]'}
    safetensors.torch.save_file(
        {"codes": torch.zeros(1, T, dtype=torch.uint8), "extra": torch.zeros(1)}, str(path), metadata=header
    )
    with pytest.raises(ValueError, match="exactly one tensor"):
        CompressedMemoryBank.load(path)


def test_fingerprint_mismatch(tmp_path):
    bank = make_bank(2)
    bank.check_codebook(FP)
    with pytest.raises(ValueError, match="codebook") as info:
        bank.check_codebook("sha256:other")
    msg = str(info.value)
    assert FP in msg and "sha256:other" in msg and "memorize()" in msg
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    with pytest.raises(ValueError, match="codebook"):
        CompressedMemoryBank.load(path, codebook_fingerprint="sha256:other")


# ---------------------------------------------------------------------- dense


def test_dense_round_trip(tmp_path):
    d = 6
    bank = DenseMemoryBank(T, d, dtype=torch.float16)
    vecs = torch.randn(4, T, d)
    assert bank.extend(["a", "b", "c", "d"], vecs, [{"i": i} for i in range(4)]) == [0, 1, 2, 3]
    assert bank.append("a", torch.zeros(T, d)) is None
    assert bank.append("a", torch.zeros(T, d), on_duplicate="overwrite") == 0
    bank.remove("c")
    assert bank.doc_ids == ["a", "b", "d"]
    assert bank.vectors.shape == (3, T, d) and bank.vectors.dtype == torch.float16
    assert bank.nbytes == 3 * T * d * 2 + 3
    assert "N=3" in repr(bank)
    path = tmp_path / "dense.safetensors"
    bank.save(path)
    loaded = DenseMemoryBank.load(path)
    assert loaded.doc_ids == bank.doc_ids and loaded.metadata == bank.metadata
    assert loaded.hidden_size == d and loaded.dtype == torch.float16
    assert torch.equal(loaded.vectors, bank.vectors)
    assert torch.equal(loaded.get_vectors(["d"]), vecs[3:4].half())
    with pytest.raises(ValueError, match="CompressedMemoryBank|DenseMemoryBank"):
        CompressedMemoryBank.load(path)
    with pytest.raises(ValueError, match="NaN or inf"):
        bank.extend(["z"], torch.full((1, T, d), 1e6))  # overflows float16
    with pytest.raises(TypeError):
        bank.extend(["z"], torch.zeros(1, T, d, dtype=torch.long))
    with pytest.raises(ValueError, match="'b'"):
        bank.extend(["b"], torch.zeros(1, T, d), on_duplicate="fail")
    empty = DenseMemoryBank(T, d)
    empty.save(path)
    assert len(DenseMemoryBank.load(path)) == 0


def test_metadata_copies_are_independent(tmp_path):
    bank = CompressedMemoryBank(256, T, FP)
    bank.extend(["a", "b", "c"], rand_codes(3, 256), [None, {}, {"k": 1}])
    bank.append("d", rand_codes(1, 256)[0])
    meta = bank.metadata
    assert meta == [{}, {}, {"k": 1}, {}]
    meta[0]["x"] = 1  # rows without metadata share storage inside the bank, never in what it hands out
    assert meta[1] == {} and meta[3] == {} and bank.metadata == [{}, {}, {"k": 1}, {}]
    bank.get_metadata("b")["y"] = 2
    assert bank.get_metadata("a") == {} and bank.get_metadata("d") == {}
    bank.save(tmp_path / "m.safetensors")
    loaded = CompressedMemoryBank.load(tmp_path / "m.safetensors").metadata
    loaded[0]["z"] = 3
    assert loaded[1] == {} and loaded[3] == {}


@pytest.mark.slow  # several processes, 4-9 s (issue 37: the fast tier skips it)
def test_ids_and_metadata_beyond_the_old_header_limit_save_and_load(tmp_path):
    """Format 1 kept ids and metadata in the safetensors header (100 MB at most: ~5M documents); format 2 keeps
    them in the body, so a bank whose ids alone exceed that limit saves and loads."""
    n = 1_200_000
    bank = CompressedMemoryBank(256, 1, FP)
    ids = [f"a-rather-long-document-id-{i:09d}-" + "x" * 50 for i in range(n)]  # 86 bytes each, 103 MB in all
    bank.extend(ids, torch.arange(n).remainder(256)[:, None])
    assert bank._id_bytes > 100_000_000
    bank.save(tmp_path / "big.safetensors")
    loaded = CompressedMemoryBank.load(tmp_path / "big.safetensors")
    assert loaded.doc_ids[-1] == ids[-1] and len(loaded) == n and torch.equal(loaded.codes, bank.codes)


def test_many_small_extends_keep_few_chunks():
    bank = CompressedMemoryBank(K, T, FP)
    codes = rand_codes(5000)
    for i in range(5000):
        bank.append(f"d{i}", codes[i])
        assert len(bank._chunks) <= 2 * (i + 1).bit_length()  # O(log N) tensors, not one per call
    assert torch.equal(bank.codes.long(), codes)
    assert torch.equal(bank.code_counts(), torch.bincount(codes.flatten(), minlength=K))

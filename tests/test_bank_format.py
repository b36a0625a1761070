"""The bank's file format (version 2): ids in the body, checksums, sharded banks with a JSON index, incremental
saves, tombstones and compaction, old files, locking and merging saves of several processes (issues 21 and 23)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import mbc_hf.memory_bank as mb
from mbc_hf.memory_bank import CompressedMemoryBank, DenseMemoryBank, load_bank

K, T, FP = 512, 4, "sha256:codebook-a"
MEMORY_BANK_PY = Path(mb.__file__)


def codes_of(ids: list[str]) -> torch.Tensor:
    """Codes that depend only on the id, so any bank's content can be checked row by row."""
    return torch.tensor([[(sum(map(ord, d)) * 31 + 7 * t) % K for t in range(T)] for d in ids])


def bank_of(ids: list[str], meta: bool = False) -> CompressedMemoryBank:
    bank = CompressedMemoryBank(K, T, FP)
    bank.extend(ids, codes_of(ids), [{"n": i} for i in range(len(ids))] if meta else None)
    return bank


def assert_consistent(bank: CompressedMemoryBank, ids: list[str]) -> None:
    assert bank.doc_ids == ids and torch.equal(bank.codes.long(), codes_of(ids))


def shard_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("bank-*.safetensors"))


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in shard_files(directory)}


def saved_bank(directory: Path, n: int, shard_rows: int) -> tuple[Path, list[str]]:
    """A bank of ids d0..d{n-1} saved as ``directory/bank.index.json`` in shards of ``shard_rows`` rows."""
    path, ids = directory / "bank.index.json", [f"d{i}" for i in range(n)]
    bank_of(ids).save(path, shard_rows=shard_rows)
    return path, ids


def test_sharded_round_trip_with_metadata(tmp_path):
    ids = [f"d{i}" for i in range(25)]
    path = tmp_path / "bank.index.json"
    bank_of(ids, meta=True).save(path, shard_rows=10)
    assert len(shard_files(tmp_path)) == 3  # 10 + 10 + 5 rows
    index = json.loads(path.read_text())
    assert [s["rows"] for s in index["shards"]] == [10, 10, 5] and index["num_documents"] == 25
    loaded = load_bank(path)
    assert isinstance(loaded, CompressedMemoryBank) and loaded.codebook_fingerprint == FP
    assert_consistent(loaded, ids)
    assert loaded.metadata == [{"n": i} for i in range(25)]


def test_appending_writes_only_a_new_shard_and_merges_small_ones(tmp_path):
    path, ids = saved_bank(tmp_path, 40, shard_rows=20)
    first = shard_bytes(tmp_path)
    bank = CompressedMemoryBank.load(path)
    shard_counts = []
    for step in range(8):  # a stream of small appends
        new = [f"s{step}-{j}" for j in range(3)]
        bank.extend(new, codes_of(new))
        ids += new
        bank.save(path, shard_rows=20)
        shard_counts.append(len(json.loads(path.read_text())["shards"]))
        for name, data in first.items():  # the two full shards are never rewritten
            assert (tmp_path / name).read_bytes() == data
    assert_consistent(CompressedMemoryBank.load(path), ids)
    assert max(shard_counts) <= 2 + 4  # O(log N) shards beside the full ones, not one per append
    assert len(shard_files(tmp_path)) == shard_counts[-1]  # replaced shards are deleted


def test_remove_is_a_tombstone_and_compact_rewrites(tmp_path):
    path, ids = saved_bank(tmp_path, 30, shard_rows=10)
    before = shard_bytes(tmp_path)
    bank = CompressedMemoryBank.load(path)
    for d in ("d3", "d15", "d16"):
        bank.remove(d)
        ids.remove(d)
    bank.save(path)
    assert shard_bytes(tmp_path) == before  # no shard rewritten
    index = json.loads(path.read_text())
    assert sorted(sum(index["tombstones"].values(), [])) == ["d15", "d16", "d3"] and index["num_documents"] == 27
    assert_consistent(CompressedMemoryBank.load(path), ids)
    (tmp_path / "bank-0123456789abcdef.safetensors").write_bytes(b"stray shard of a killed write")
    bank.compact()
    index = json.loads(path.read_text())
    assert index["tombstones"] == {} and [s["rows"] for s in index["shards"]] == [27]
    assert shard_files(tmp_path) == [index["shards"][0]["file"]]  # old and stray shards deleted
    assert_consistent(CompressedMemoryBank.load(path), ids)


def test_overwrite_rewrites_only_the_shard_that_holds_the_row(tmp_path):
    path, ids = saved_bank(tmp_path, 30, shard_rows=10)
    names = [s["file"] for s in json.loads(path.read_text())["shards"]]
    bank = CompressedMemoryBank.load(path)
    bank.extend(["d12"], codes_of(["other"]), on_duplicate="overwrite")
    bank.save(path)
    after = [s["file"] for s in json.loads(path.read_text())["shards"]]
    assert after[0] == names[0] and after[2] == names[2] and after[1] != names[1]
    loaded = CompressedMemoryBank.load(path)
    assert loaded.doc_ids == ids and torch.equal(loaded.get_codes(["d12"]).long(), codes_of(["other"]))
    # an overwritten row in the last shard, then an append that merges that shard: written once, nothing orphaned
    loaded.extend(["d25"], codes_of(["again"]), on_duplicate="overwrite")
    loaded.extend([f"n{i}" for i in range(6)], codes_of([f"n{i}" for i in range(6)]))
    loaded.save(path, shard_rows=20)
    index = json.loads(path.read_text())
    assert shard_files(tmp_path) == sorted(s["file"] for s in index["shards"])
    again = CompressedMemoryBank.load(path)
    assert again.doc_ids == ids + [f"n{i}" for i in range(6)]
    assert torch.equal(again.get_codes(["d25"]).long(), codes_of(["again"]))


def test_a_flipped_bit_is_refused_with_the_file_named(tmp_path):
    for name in ("bank.safetensors", "bank.index.json"):
        path = tmp_path / name
        bank_of([f"d{i}" for i in range(50)]).save(path)
        target = path if name.endswith(".safetensors") else tmp_path / json.loads(path.read_text())["shards"][0]["file"]
        data = bytearray(target.read_bytes())
        data[-3] ^= 0x01  # inside the doc ids' JSON at the end of the data area
        target.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=f"{target.name}: checksum mismatch"):
            CompressedMemoryBank.load(path)


def test_a_version_1_file_stays_readable_and_is_saved_as_version_2(tmp_path):
    path = tmp_path / "old.safetensors"
    header = {"format": "mbc-compressed-memory-bank", "format_version": "1", "codebook_size": str(K),
              "num_tokens": str(T), "codebook_fingerprint": FP, "doc_ids": json.dumps(["a", "b"]),
              "metadata": json.dumps([{"x": 1}, {}])}
    safetensors.torch.save_file({"codes": codes_of(["a", "b"]).to(torch.uint16)}, str(path), metadata=header)
    bank = CompressedMemoryBank.load(path)
    assert_consistent(bank, ["a", "b"]) and bank.metadata == [{"x": 1}, {}]
    bank.append("c", codes_of(["c"])[0])
    bank.save(path)
    with safetensors.safe_open(str(path), "pt") as fh:
        assert fh.metadata()["format_version"] == "2"
    assert_consistent(CompressedMemoryBank.load(path), ["a", "b", "c"])


def test_dense_bank_shards_too(tmp_path):
    bank = DenseMemoryBank(2, 3)
    bank.extend(["a", "b", "c"], torch.arange(18, dtype=torch.float32).reshape(3, 2, 3))
    bank.save(tmp_path / "dense.index.json", shard_rows=2)
    loaded = load_bank(tmp_path / "dense.index.json")
    assert isinstance(loaded, DenseMemoryBank) and torch.equal(loaded.vectors, bank.vectors)


def test_a_missing_or_replaced_shard_is_named(tmp_path):
    path = tmp_path / "bank.index.json"
    bank_of([f"d{i}" for i in range(20)]).save(path, shard_rows=10)
    first, second = [s["file"] for s in json.loads(path.read_text())["shards"]]
    (tmp_path / first).write_bytes((tmp_path / second).read_bytes())
    with pytest.raises(ValueError, match=f"{first}: does not match its entry"):
        CompressedMemoryBank.load(path)
    (tmp_path / first).unlink()
    with pytest.raises(FileNotFoundError, match="shard"):
        CompressedMemoryBank.load(path)


CHILD = f"""
import importlib, sys, types
package = types.ModuleType("mbc_hf_files")
package.__path__ = [{str(MEMORY_BANK_PY.parent)!r}]
sys.modules["mbc_hf_files"] = package
mb = importlib.import_module("mbc_hf_files.memory_bank")
import torch
path, prefix, go = sys.argv[1], sys.argv[2], sys.argv[3]
bank = mb.CompressedMemoryBank.load(path)
print("loaded", flush=True)
import os, time
while not os.path.exists(go):
    time.sleep(0.01)
ids = [f"{{prefix}}{{i}}" for i in range(300)]
bank.extend(ids, torch.tensor([[(sum(map(ord, d)) * 31 + 7 * t) % {K} for t in range({T})] for d in ids]))
bank.remove(prefix + "old")
bank.save(path)
"""


@pytest.mark.slow  # several processes, 4-9 s (issue 37: the fast tier skips it)
@pytest.mark.parametrize("name", ["bank.safetensors", "bank.index.json"])
def test_two_processes_that_load_memorize_and_save_one_bank_lose_nothing(tmp_path, name):
    path = tmp_path / name
    bank_of(["base", "a-old", "b-old"]).save(path)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(path), prefix, str(go)], stdout=subprocess.PIPE,
                              text=True) for prefix in ("a-", "b-")]
    for proc in procs:  # both hold the same old bank before either saves
        assert proc.stdout.readline().startswith("loaded")
    go.touch()
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    merged = CompressedMemoryBank.load(path)
    expected = ["base"] + [f"{p}{i}" for p in ("a-", "b-") for i in range(300)]
    assert sorted(merged.doc_ids) == sorted(expected)  # 300 + 300 in, 600 out; both removals applied
    assert torch.equal(merged.get_codes(expected).long(), codes_of(expected))


KILLED_SHARD_WRITE = f"""
import importlib, os, sys, types
package = types.ModuleType("mbc_hf_files")
package.__path__ = [{str(MEMORY_BANK_PY.parent)!r}]
sys.modules["mbc_hf_files"] = package
mb = importlib.import_module("mbc_hf_files.memory_bank")
import torch
path = sys.argv[1]
bank = mb.CompressedMemoryBank.load(path)
ids = [f"new{{i}}" for i in range(50)]
bank.extend(ids, torch.zeros(50, {T}, dtype=torch.long))
real_replace = os.replace
def replace(src, dst):
    if dst.endswith(".safetensors"):  # the new shard is complete but not renamed: die here
        os.kill(os.getpid(), 9)
    return real_replace(src, dst)
os.replace = replace
bank.save(path)
"""


def test_a_process_killed_during_a_shard_write_leaves_the_bank_complete(tmp_path):
    path = tmp_path / "bank.index.json"
    ids = [f"d{i}" for i in range(20)]
    bank_of(ids).save(path, shard_rows=10)
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILLED_SHARD_WRITE, str(path)], timeout=120)
    assert proc.returncode == -9
    assert path.read_bytes() == before
    assert_consistent(CompressedMemoryBank.load(path), ids)


def test_save_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="shard_rows"):
        bank_of(["a"]).save(tmp_path / "b.index.json", shard_rows=0)
    with pytest.raises(ValueError, match="compact\\(\\) needs a bank loaded from or saved to an .index.json"):
        bank_of(["a"]).compact()
    (tmp_path / "broken.index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="broken.index.json: not a memory bank index"):
        CompressedMemoryBank.load(tmp_path / "broken.index.json")
    assert os.listdir(tmp_path) == ["broken.index.json"]

"""Storage you can trust beside other files, processes and codebooks (issues 34 and 40, the memory bank items):
a save deletes only files it wrote, a hostile index is refused before any shard is read, checksums cover every
header field, a save never merges two codebooks, never writes an index naming missing shards, writes through a
symbolic link, readers never see a missing shard, and failed saves name the file and leave no orphans."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import mbc_hf.memory_bank as mb
from mbc_hf.memory_bank import CompressedMemoryBank, DenseMemoryBank, load_bank

K, T, FP = 512, 4, "sha256:codebook-a"


def codes_of(ids: list[str]) -> torch.Tensor:
    return torch.tensor([[(sum(map(ord, d)) * 31 + 7 * t) % K for t in range(T)] for d in ids])


def bank_of(ids: list[str], fingerprint: str = FP) -> CompressedMemoryBank:
    bank = CompressedMemoryBank(K, T, fingerprint)
    bank.extend(ids, codes_of(ids))
    return bank


def ids_of(n: int, prefix: str = "d") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def assert_holds(bank: CompressedMemoryBank, ids: list[str]) -> None:
    assert bank.doc_ids == ids and torch.equal(bank.codes.long(), codes_of(ids))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def shard_names(path: Path) -> list[str]:
    return [s["file"] for s in json.loads(path.read_text())["shards"]]


def edit_index(path: Path, edit, checksum: bool = True) -> None:
    """Apply ``edit`` to the index's JSON and (by default) give it a valid ``index_checksum``, as a forger would."""
    index = json.loads(path.read_text())
    edit(index)
    if checksum:
        index["index_checksum"] = mb._fields_checksum(index, "index_checksum")
    path.write_text(json.dumps(index))


def flip_bit(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


# ---------------------------------------------------------------------------------------- issue 34, item 1 and 40.2


def test_saving_over_a_crafted_index_deletes_none_of_the_files_it_names(tmp_path):
    foreign = {"notes.txt": b"my notes", "model.safetensors": b"weights", "config.json": b"{}"}
    for name, data in foreign.items():
        (tmp_path / name).write_bytes(data)
    path = tmp_path / "bank.index.json"
    path.write_text(json.dumps({"format": "mbc-compressed-memory-bank", "format_version": "2", "num_documents": 3,
                                "shards": [{"file": f, "rows": 1, "checksum": "x"} for f in foreign]}))
    bank_of(ids_of(5)).save(path, shard_rows=2)
    assert all((tmp_path / f).read_bytes() == data for f, data in foreign.items())
    assert_holds(CompressedMemoryBank.load(path), ids_of(5))


@pytest.mark.parametrize("through", ["overwrite-and-save", "compact", "save-unlinked"])
def test_a_copied_index_keeps_the_shards_the_original_names(tmp_path, through):
    a, b = tmp_path / "a.index.json", tmp_path / "b.index.json"
    bank_of(ids_of(30)).save(a, shard_rows=10)
    b.write_bytes(a.read_bytes())
    copy = CompressedMemoryBank.load(b)
    if through == "overwrite-and-save":
        copy.extend(["d12"], codes_of(["x"]), on_duplicate="overwrite")
        copy.save(b)
    elif through == "compact":
        copy.remove("d3")
        copy.compact()
    else:
        bank_of(["other"]).save(b)  # replaces b; a's shards, which b named, stay
    assert_holds(CompressedMemoryBank.load(a), ids_of(30))
    # and the other way round: compacting the original keeps what the copy still names
    if through != "save-unlinked":
        original = CompressedMemoryBank.load(a)
        original.remove("d0")
        original.compact()
        CompressedMemoryBank.load(b)


def test_no_bank_call_deletes_a_file_it_did_not_write(tmp_path):
    other = tmp_path / "other.index.json"  # another bank in the same folder
    bank_of(ids_of(3, "o")).save(other, shard_rows=2)
    for name, data in {"notes.txt": b"notes", "model.safetensors": b"w", "config.json": b"{}",
                       ".notes.txt.abc123.tmp": b"an editor's temp file", "bank.safetensors.lock.txt": b"x"}.items():
        (tmp_path / name).write_bytes(data)
    other_shard = shard_names(other)[0]
    path = tmp_path / "bank.index.json"
    checksum = mb._file_header(str(tmp_path / other_shard))["checksum"]
    path.write_text(json.dumps({  # forged: names another bank's shard, with its right checksum
        "format": "mbc-compressed-memory-bank", "format_version": "2", "codebook_size": str(K),
        "codebook_fingerprint": FP, "num_tokens": str(T), "num_documents": 2,
        "shards": [{"file": other_shard, "rows": 2, "checksum": checksum}]}))
    forged = CompressedMemoryBank.load(path)  # a valid index, of another bank's shard
    before = {k: v for k, v in snapshot(tmp_path).items() if k != "bank.index.json"}
    forged.append("f1", codes_of(["f1"])[0])
    forged.save(path)  # linked: keeps the other bank's shard in its index
    bank = CompressedMemoryBank.load(path)
    bank.extend(ids_of(7), codes_of(ids_of(7)))
    bank.extend(["d1"], codes_of(["y"]), on_duplicate="overwrite")
    bank.save(path, shard_rows=3)
    bank.remove(["o0", "d2"])
    bank.save(path, shard_rows=3)
    bank.compact(shard_rows=3)
    bank_of(ids_of(4)).save(path)  # an unlinked save replaces the bank
    again = CompressedMemoryBank.load(path)
    again.compact()
    again.save(tmp_path / "single.safetensors")
    CompressedMemoryBank.load(tmp_path / "single.safetensors").save(tmp_path / "single.safetensors")
    after = snapshot(tmp_path)
    assert {k: after.get(k) for k in before} == before
    assert_holds(CompressedMemoryBank.load(other), ids_of(3, "o"))


# ---------------------------------------------------------------------------------------- issue 34, item 2


@pytest.mark.parametrize("entries", ["repeated", "absolute", "parent", "symlink-out"])
def test_an_index_with_repeated_or_escaping_shards_is_refused_before_any_shard_is_read(tmp_path, monkeypatch,
                                                                                       entries):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "bank"
    folder.mkdir()
    path = folder / "bank.index.json"
    bank_of(ids_of(4)).save(path)
    shard = json.loads(path.read_text())["shards"][0]
    if entries == "repeated":
        shards, match = [shard] * 100_000, "names the shard .* twice"
    elif entries == "absolute":
        shards, match = [dict(shard, file=str(folder / shard["file"]))], "malformed shard entry"
    elif entries == "parent":
        shards, match = [dict(shard, file="../bank/" + shard["file"])], "malformed shard entry"
    else:
        (folder / shard["file"]).rename(outside / shard["file"])
        (folder / shard["file"]).symlink_to(outside / shard["file"])
        shards, match = [shard], "symbolic link out of the bank's folder"
    edit_index(path, lambda index: index.update(shards=shards, num_documents=4 * len(shards)))
    reads = []
    monkeypatch.setattr(mb, "_read_safetensors", lambda p: reads.append(p))
    with pytest.raises(ValueError, match=match):
        CompressedMemoryBank.load(path)
    assert reads == []


# ---------------------------------------------------------------------------------------- issue 34, item 3


@pytest.mark.parametrize("name", ["bank.safetensors", "bank.index.json"])
@pytest.mark.parametrize("field", [(b"codebook-a", b"codebook-c"),  # one bit flipped in each
                                   (b'"codebook_size":"512"', b'"codebook_size":"513"')])
def test_a_flipped_bit_in_a_header_field_is_refused(tmp_path, name, field):
    path = tmp_path / name
    bank_of(ids_of(6)).save(path)
    target = path if name.endswith(".safetensors") else tmp_path / shard_names(path)[0]
    flip_bit(target, *field)
    with pytest.raises(ValueError, match=f"{target.name}: header checksum mismatch"):
        CompressedMemoryBank.load(path)


def test_a_flipped_bit_in_the_index_is_refused(tmp_path):
    path = tmp_path / "bank.index.json"
    bank = bank_of(ids_of(30))
    bank.save(path, shard_rows=10)
    bank.remove("d15")
    bank.save(path)
    flip_bit(path, b'"d15"', b'"d14"')  # would silently remove d14 instead of d15
    with pytest.raises(ValueError, match="bank.index.json: index checksum mismatch"):
        CompressedMemoryBank.load(path)


def old_format_bank(directory: Path) -> tuple[Path, Path]:
    """A single-file bank and a sharded one exactly as mbc-hf wrote them before `header_checksum` and
    `index_checksum`: the header's `checksum` covers the tensors only, the index has no checksum."""
    def write(path: Path, ids: list[str]) -> str:
        tensors = {"codes": codes_of(ids).to(torch.uint16), "doc_ids": mb._json_tensor(ids)}
        header = {"format": "mbc-compressed-memory-bank", "format_version": "2", "codebook_size": str(K),
                  "codebook_fingerprint": FP, "num_tokens": str(T), "num_documents": str(len(ids)),
                  "checksum": mb._checksum(tensors)}
        safetensors.torch.save_file(tensors, str(path), metadata=header)
        return header["checksum"]

    single = directory / "old.safetensors"
    write(single, ids_of(5))
    shards = [{"file": "old-0123456789abcdef.safetensors", "rows": 3}, {"file": "old-fedcba9876543210.safetensors",
                                                                          "rows": 2}]
    shards[0]["checksum"] = write(directory / shards[0]["file"], ids_of(3))
    shards[1]["checksum"] = write(directory / shards[1]["file"], ids_of(5)[3:])
    index = directory / "old.index.json"
    index.write_text(json.dumps({"format": "mbc-compressed-memory-bank", "format_version": "2",
                                 "codebook_size": str(K), "codebook_fingerprint": FP, "num_tokens": str(T),
                                 "num_documents": 4, "shards": shards, "tombstones": {shards[1]["file"]: ["d4"]}},
                                indent=1))
    return single, index


def test_banks_written_before_the_header_checksum_still_load_and_save(tmp_path):
    single, index = old_format_bank(tmp_path)
    assert_holds(CompressedMemoryBank.load(single), ids_of(5))
    bank = CompressedMemoryBank.load(index)
    assert_holds(bank, ids_of(4))
    bank.append("new", codes_of(["new"])[0])
    bank.save(index)
    assert "index_checksum" in json.loads(index.read_text())
    assert_holds(CompressedMemoryBank.load(index), ids_of(4) + ["new"])


# ---------------------------------------------------------------------------------------- issue 34, item 4


@pytest.mark.parametrize("name", ["bank.safetensors", "bank.index.json"])
def test_a_save_never_merges_banks_of_two_codebooks(tmp_path, name):
    path = tmp_path / name
    bank_of(ids_of(3)).save(path)
    mine = CompressedMemoryBank.load(path)
    bank_of(ids_of(3, "b"), fingerprint="sha256:codebook-b").save(path)  # PATH replaced by another codebook's bank
    before = snapshot(tmp_path)
    mine.append("mine", codes_of(["mine"])[0])
    with pytest.raises(ValueError, match=r"was replaced since .*codebook_fingerprint 'sha256:codebook-b' "
                                         r"\(this bank: 'sha256:codebook-a'\).*save this bank to another path"):
        mine.save(path)
    assert snapshot(tmp_path) == before
    assert CompressedMemoryBank.load(path).codebook_fingerprint == "sha256:codebook-b"


# ---------------------------------------------------------------------------------------- issue 34, item 5


@pytest.mark.parametrize("lost", ["every-file", "one-shard", "replaced-shard"])
def test_a_save_after_the_files_were_deleted_writes_every_row(tmp_path, lost):
    path = tmp_path / "bank.index.json"
    bank_of(ids_of(30)).save(path, shard_rows=10)
    bank = CompressedMemoryBank.load(path)
    first = tmp_path / shard_names(path)[0]
    if lost == "every-file":
        for p in tmp_path.glob("bank*"):
            p.unlink()
    elif lost == "one-shard":
        first.unlink()
    else:
        first.write_bytes((tmp_path / shard_names(path)[1]).read_bytes())
    bank.append("new", codes_of(["new"])[0])
    bank.save(path, shard_rows=10)
    assert_holds(CompressedMemoryBank.load(path), ids_of(30) + ["new"])


# ---------------------------------------------------------------------------------------- issue 34, item 6


@pytest.mark.parametrize("name", ["bank.safetensors", "bank.index.json"])
def test_a_bank_reached_through_a_symlink_is_written_at_its_target(tmp_path, name):
    (tmp_path / "real").mkdir()
    (tmp_path / "elsewhere").mkdir()
    real, link = tmp_path / "real" / name, tmp_path / "elsewhere" / name
    bank_of(ids_of(4)).save(real, shard_rows=2)
    link.symlink_to(real)
    through_link, direct = CompressedMemoryBank.load(link), CompressedMemoryBank.load(real)
    through_link.append("via-link", codes_of(["via-link"])[0])
    through_link.save(link, shard_rows=2)
    direct.append("direct", codes_of(["direct"])[0])
    direct.save(real, shard_rows=2)  # merges with the save made through the link: one bank, not two
    assert link.is_symlink() and os.listdir(tmp_path / "elsewhere") == [name]
    assert_holds(CompressedMemoryBank.load(link), ids_of(4) + ["via-link", "direct"])


# ---------------------------------------------------------------------------------------- issue 34, item 7


def test_a_reader_retries_when_a_writer_deletes_a_shard_while_it_loads(tmp_path, monkeypatch):
    path = tmp_path / "bank.index.json"
    bank_of(ids_of(30)).save(path, shard_rows=10)
    writer = CompressedMemoryBank.load(path)
    real_read = mb._read_safetensors
    interleaved = []

    def read_after_a_writer_ran(shard_path):
        if not interleaved:  # between the reader's index read and its first shard read: the writer compacts
            interleaved.append(shard_path)
            writer.remove("d29")
            writer.compact()
            assert not os.path.exists(shard_path)
        return real_read(shard_path)

    monkeypatch.setattr(mb, "_read_safetensors", read_after_a_writer_ran)
    assert_holds(CompressedMemoryBank.load(path), ids_of(29))
    assert interleaved


# ---------------------------------------------------------------------------------------- issue 34, item 12


def test_compact_deletes_the_temporary_files_of_killed_writers_and_only_those(tmp_path):
    path = tmp_path / "bank.index.json"
    bank_of(ids_of(5)).save(path, shard_rows=2)
    strays = [".bank-0123456789abcdef.safetensors.k2j_x9ab.tmp", ".bank.index.json.abcdefgh.tmp"]
    kept = [".other-0123456789abcdef.safetensors.k2j_x9ab.tmp", ".notes.txt.abcdefgh.tmp", "bank.tmp"]
    for name in strays + kept:
        (tmp_path / name).write_bytes(b"partial")
    CompressedMemoryBank.load(path).compact()
    assert [n for n in strays + kept if (tmp_path / n).exists()] == kept


# ---------------------------------------------------------------------------------------- issue 40, items 1, 3, 4, 5


@pytest.mark.parametrize("edit,match", [
    (lambda index: index["shards"].pop(), "num_documents is 30 but the shard entries hold 20 live rows"),
    (lambda index: index.update(num_documents=999), "num_documents is 999"),
    (lambda index: index.update(num_documents="abc"), "num_documents is 'abc'"),
    (lambda index: index.pop("num_documents"), "num_documents is None"),
], ids=["lost-shard-entry", "999", "abc", "missing"])
def test_num_documents_must_be_the_number_of_rows(tmp_path, edit, match):
    path = tmp_path / "bank.index.json"
    bank_of(ids_of(30)).save(path, shard_rows=10)
    edit_index(path, edit)
    with pytest.raises(ValueError, match=f"bank.index.json: {match}"):
        CompressedMemoryBank.load(path)
    bank_of(ids_of(30)).save(tmp_path / "b.index.json", shard_rows=10)  # edited without fixing its checksum
    edit_index(tmp_path / "b.index.json", edit, checksum=False)
    with pytest.raises(ValueError, match="b.index.json: index checksum mismatch"):
        CompressedMemoryBank.load(tmp_path / "b.index.json")


@pytest.mark.parametrize("tombstones,match", [
    (7, "'tombstones' must map shard files to lists of doc ids, got int"),
    ([["d1"]], "'tombstones' must map shard files to lists of doc ids, got list"),
    ("FIRST:[['d1']]", "tombstones of .* must be a list of doc id strings"),
    ("FIRST:7", "tombstones of .* must be a list of doc id strings"),
    ({"bank-0123456789abcdef.safetensors": ["d1"]}, "tombstones name the shard .* which the index does not list"),
], ids=["int", "list-of-lists", "value-list-of-lists", "value-int", "unknown-shard"])
def test_tombstones_of_the_wrong_type_name_the_index(tmp_path, tombstones, match):
    path = tmp_path / "bank.index.json"
    bank_of(ids_of(4)).save(path)
    if isinstance(tombstones, str):
        tombstones = {shard_names(path)[0]: eval(tombstones.split(":", 1)[1])}
    edit_index(path, lambda index: index.update(tombstones=tombstones))
    with pytest.raises(ValueError, match=f"bank.index.json: {match}"):
        CompressedMemoryBank.load(path)


def test_an_index_nested_too_deeply_names_the_file(tmp_path):
    path = tmp_path / "bank.index.json"
    path.write_text('{"shards": [], "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match=r"bank.index.json: not a memory bank index: not valid JSON \(nested too"):
        load_bank(path)


def test_load_bank_of_a_file_without_a_format_tag_says_it_is_not_a_bank(tmp_path):
    path = tmp_path / "bank.index.json"
    path.write_text(json.dumps({"shards": [], "num_documents": 0}))
    with pytest.raises(ValueError, match="bank.index.json: has no format tag, but a memory bank's is "
                                         "'mbc-compressed-memory-bank' or 'mbc-dense-memory-bank'"):
        load_bank(path)
    path.write_text(json.dumps({"format": "something", "shards": [], "num_documents": 0}))
    with pytest.raises(ValueError, match="has the format tag 'something', but a memory bank's is"):
        load_bank(path)


# ---------------------------------------------------------------------------------------- issue 40, item 13


@pytest.mark.parametrize("name", ["bank.safetensors", "bank.index.json"])
def test_a_save_on_a_full_disk_names_the_file_and_leaves_no_orphans(tmp_path, monkeypatch, name):
    path = tmp_path / name
    bank = bank_of(ids_of(10))
    bank.save(path, shard_rows=4)
    before = snapshot(tmp_path)
    bank.extend(ids_of(30, "n"), codes_of(ids_of(30, "n")))
    real_save, calls = safetensors.torch.save_file, []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2 or name.endswith(".safetensors"):  # the second shard, or the single file
            Path(filename).write_bytes(b"\0" * 9)
            raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                              'message: "No space left on device" })')
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match=r"cannot write memory bank file .*No space left.*free disk space.*"
                                      r"bank(-[0-9a-f]{16})?\.safetensors"):
        bank.save(path, shard_rows=4)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # no new shard, no temporary file, the old bank as it was
    assert_holds(CompressedMemoryBank.load(path), ids_of(10))
    bank.save(path, shard_rows=4)  # and the next save works
    assert_holds(CompressedMemoryBank.load(path), ids_of(10) + ids_of(30, "n"))


# ---------------------------------------------------------------------------------------- issue 40, item 14


def test_remove_takes_a_list_in_one_pass(tmp_path):
    n, ids = 40_000, ids_of(40_000)
    bank = CompressedMemoryBank(K, T, FP)
    bank.extend(ids, torch.arange(n * T).reshape(n, T) % K, [{"i": i} if i % 3 == 0 else None for i in range(n)])
    gone = ids[::20]  # 2,000 documents
    start = time.perf_counter()
    bank.remove(gone + gone[:5])  # an id listed twice is removed once
    assert time.perf_counter() - start < 2.0  # the loop of single removes took 67 s
    kept = [i for i in range(n) if i % 20]
    assert bank.doc_ids == [ids[i] for i in kept] and [bank.index_of(ids[i]) for i in kept] == list(range(len(kept)))
    assert torch.equal(bank.codes.long(), (torch.arange(n * T).reshape(n, T) % K)[kept])
    assert bank.metadata == [{"i": i} if i % 3 == 0 else {} for i in kept]
    assert torch.equal(bank.code_counts(), torch.bincount(bank.codes.long().reshape(-1), minlength=K))
    with pytest.raises(KeyError, match="'absent'"):
        bank.remove(["d1", "absent"])
    assert "d1" in bank and len(bank) == len(kept)
    bank.remove("d1")
    assert "d1" not in bank and bank.index_of("d2") == 0  # d0 went in the bulk remove


def test_bulk_remove_of_a_sharded_bank_is_tombstones_across_shards(tmp_path):
    path = tmp_path / "bank.index.json"
    bank_of(ids_of(30)).save(path, shard_rows=10)
    bank = CompressedMemoryBank.load(path)
    bank.remove(["d29", "d3", "d15", "d16", "d0"])
    bank.save(path)
    tombstones = json.loads(path.read_text())["tombstones"]
    assert sorted(map(sorted, tombstones.values())) == [["d0", "d3"], ["d15", "d16"], ["d29"]]
    expected = [d for d in ids_of(30) if d not in ("d29", "d3", "d15", "d16", "d0")]
    assert_holds(CompressedMemoryBank.load(path), expected)
    dense = DenseMemoryBank(2, 3)
    dense.extend(["a", "b", "c"], torch.arange(18.0).reshape(3, 2, 3))
    dense.remove(["c", "a"])
    assert dense.doc_ids == ["b"] and torch.equal(dense.vectors, torch.arange(6.0, 12.0).reshape(1, 2, 3))

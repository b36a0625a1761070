"""Memory banks for MBC (Memory Bank Compression, arXiv 2601.00756).

MBC encodes each document into ``T`` context vectors and vector-quantizes each
of them against a ``K``-entry codebook; the memory bank then stores only the
integer codes.  This module holds the storage side of that:

* :class:`CompressedMemoryBank` -- the MBC bank: integer codes ``(N, T)``.
* :class:`DenseMemoryBank` -- the uncompressed, MAC-style bank (VQ bypassed):
  float vectors ``(N, T, d)``, kept for comparison.

Both keep exactly one row per unique document id, an optional JSON-serialisable
metadata dict per row, and save to / load from one ``.safetensors`` file or, for a
path ending in ``.index.json``, safetensors shards beside a JSON index (as sharded
checkpoints' ``model.safetensors.index.json``); no pickle.

File format 2 (`_DocRowBank.save`): the rows, the doc ids and the metadata are
tensors in the file body (ids and metadata as uint8 UTF-8 JSON), so a file has no
row ceiling; the header holds the format tag, T, the payload keys, a SHA-256
``checksum`` of the tensors and a ``header_checksum`` of every other header key,
both verified on load (files written before ``header_checksum`` existed are read
with the tensor checksum only). A sharded bank's JSON index carries an
``index_checksum`` of its other fields the same way. Sharded banks append by writing
a new shard, record removals as tombstones in the index (``compact()`` rewrites
them), and every save runs under ``<path>.lock`` and merges with a concurrent
writer's save instead of dropping it. A save deletes only superseded shards of the
bank it replaces, never a file it did not write. Format-1 files (ids in the header)
stay readable.

Where the rules come from:

* MBC paper, Section 3: the memory bank holds, per stored item, the ``T``
  codebook indices of its context vectors (the reference implementation keeps
  them as ``int64``, one row per QA row of the training data).  Here codes are
  kept in the *smallest unsigned* dtype that can hold every index in
  ``[0, K)`` (``uint8`` for ``K <= 256``, ``uint16`` for ``K <= 65536``), and
  there is one row per *unique document*, keyed by a string ``doc_id``.
* The duplicate policy (``"skip"``, ``"overwrite"``, ``"fail"``) follows
  Haystack's ``DuplicatePolicy`` for document stores.
* The codes are only meaningful together with the codebook they index; the
  model owns that codebook and identifies it by a fingerprint string, which the
  bank records and checks (:meth:`CompressedMemoryBank.check_codebook`).

This file must stay self-contained (stdlib, torch, safetensors, filelock and the
package's ``atomic`` helper only): it is copied next to checkpoints for
``trust_remote_code`` loading.

Not thread-safe: guard a bank with a lock if several threads mutate it.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import errno
import hashlib
import itertools
import json
import math
import os
import re
import struct
import uuid
from typing import Any, Sequence

import safetensors
import safetensors.torch
import torch

from .atomic import atomic_write, temporary_files

__all__ = ["CompressedMemoryBank", "DenseMemoryBank", "DUPLICATE_POLICIES", "load_bank"]

#: Accepted values of ``on_duplicate`` (Haystack ``DuplicatePolicy`` names).
DUPLICATE_POLICIES = ("skip", "overwrite", "fail")
#: File name of the memory bank inside a saved folder / Hub repo.
MEMORY_BANK_FILE = "memory_bank.safetensors"

# 2: doc ids and metadata in the file body, checksums in the header (`header_checksum` optional, see the module
# docstring: adding it changed no layout, and older readers ignore it); 1: ids in the header
_FORMAT_VERSION = "2"
_READABLE_VERSIONS = ("1", "2")
#: A bank saved to a path with this suffix is a JSON index of safetensors shards (`_DocRowBank.save`).
INDEX_SUFFIX = ".index.json"
#: Rows per shard of a sharded bank (default of ``save(shard_rows=...)``): 2^20 rows, 24 MiB of codes at T=12.
SHARD_ROWS = 1 << 20
_SHARD_NAME = re.compile(r"[0-9a-f]{16}\.safetensors")  # after "<index stem>-"
_SHARD_FILE = re.compile(r"[^/\\\x00]*-[0-9a-f]{16}\.safetensors")  # any shard named by an index (a copied index too)
# Loads of a sharded bank retried when a writer replaced its index and deleted a shard the old index named.
_LOAD_ATTEMPTS = 10
# Same-width signed dtypes, for bit views of unsigned tensors (see _extend).
_SIGNED_VIEW = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
# Elements converted to int64 at a time when counting / range-checking codes.
_COUNT_CHUNK_ELEMENTS = 1 << 22
# The metadata of every row without metadata: one shared dict, never mutated (rows are replaced, and readers get
# deep copies), instead of one empty dict (64 bytes) per row.
_NO_METADATA: dict = {}


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _normalise_metadata(item: Any, position: int) -> dict:
    """Return a JSON-normalised deep copy of one metadata dict.

    Raises ``TypeError`` if it is not a dict with str keys and JSON values, or
    if it would not round-trip unchanged through JSON (tuples, int keys, NaN).
    """
    if item is None or (isinstance(item, dict) and not item):
        return _NO_METADATA
    if not isinstance(item, dict):
        raise TypeError(f"metadata[{position}] must be a dict or None, got {type(item).__name__}")
    try:
        text = json.dumps(item, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metadata[{position}] is not JSON-serialisable: {exc}") from exc
    try:  # the header is UTF-8: a lone surrogate (U+D800-U+DFFF) would only fail at save()
        json.dumps(item, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"metadata[{position}] holds a lone surrogate ({exc.object[exc.start:exc.end]!r}), which "
                         "is not valid Unicode and cannot be saved; decode its source with errors='replace'") from None
    normalised = json.loads(text)
    if normalised != item:
        raise TypeError(
            f"metadata[{position}] does not round-trip through JSON unchanged "
            "(use str keys, lists instead of tuples)"
        )
    return normalised


def check_doc_ids_and_metadata(doc_ids: Sequence[str], metadata: Sequence[dict | None] | None
                               ) -> tuple[list[str], list[dict]]:
    """Validate what a bank will store for a batch of documents, before anything changes: ids must be non-empty
    valid Unicode str (UTF-8 encodable: they are saved in the header and hashed), metadata one JSON dict (or None) per
    id. Returns the ids as a list and the normalised metadata (`_normalise_metadata`).

    Raises:
        TypeError: a single str for ``doc_ids``, a dict for ``metadata``, metadata that is not JSON.
        ValueError: an empty, non-str or lone-surrogate id, a lone surrogate in metadata, or lengths that differ.
    """
    if isinstance(doc_ids, str):
        raise TypeError("doc_ids must be a list of str, not a single str (use append() for one document)")
    doc_ids = list(doc_ids)
    for i, d in enumerate(doc_ids):
        if not isinstance(d, str) or not d:
            raise ValueError(f"doc_ids[{i}] must be a non-empty str, got {d!r}")
        try:
            d.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"doc_ids[{i}] = {d!r} holds a lone surrogate, which is not valid Unicode and cannot be "
                             "saved; decode the source with errors='replace' or pick another id") from None
    if metadata is None:
        return doc_ids, [_NO_METADATA] * len(doc_ids)
    if isinstance(metadata, dict):
        raise TypeError("metadata must be a list of dicts (one per document), not a dict")
    meta = list(metadata)
    if len(meta) != len(doc_ids):
        raise ValueError(f"got {len(meta)} metadata dicts for {len(doc_ids)} doc_ids")
    return doc_ids, [_normalise_metadata(m, i) for i, m in enumerate(meta)]


class _DocRowBank:
    """Private base: one tensor row per unique ``doc_id`` plus per-row metadata.

    Subclasses define the row payload (codes or vectors) through the hooks
    ``_coerce_rows``, ``_check_loaded_rows``, ``_payload_header`` and
    ``_from_header``, and the class attributes below.
    """

    _FORMAT: str = ""
    _TENSOR_NAME: str = ""
    _ROWS_ARG: str = "rows"

    def __init__(self, num_tokens: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._num_tokens = _positive_int(num_tokens, "num_tokens")
        self._row_shape = tuple(row_shape)
        self._dtype = dtype
        self._doc_ids: list[str] = []
        self._index: dict[str, int] = {}
        self._meta: list[dict] = []
        # Appended row blocks; consolidated lazily by _rows().  Stored tensors
        # are never modified in place once created (copy-on-write), so tensors
        # handed out by the `codes` / `vectors` properties stay valid snapshots.
        self._chunks: list[torch.Tensor] = []
        # Optional compact keys (`CompressedMemoryBank(key_bytes=...)`): uint8 (n, key_bytes) blocks with exactly
        # the row boundaries of `_chunks`, so every row operation below keeps them aligned with the rows.
        self._key_bytes: int | None = None
        self._key_chunks: list[torch.Tensor] = []
        self._id_bytes = 0
        # The file this bank was loaded from / saved to, and the ids changed or removed since (`save` merges them
        # into that file's current content if another writer saved to it meanwhile).
        self._sync: _Sync | None = None
        self._changed: set[str] = set()
        self._removed: set[str] = set()

    # ------------------------------------------------------------------ hooks
    def _coerce_rows(self, rows: Any, doc_ids: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def _rows_appended(self, rows: torch.Tensor) -> None:
        """Called after new rows are appended (cache maintenance)."""

    def _invalidate(self) -> None:
        """Called after rows are overwritten or removed (cache maintenance)."""

    def _payload_header(self) -> dict[str, str]:
        raise NotImplementedError

    @classmethod
    def _from_header(cls, header: dict[str, str], path: str) -> "_DocRowBank":
        raise NotImplementedError

    def _check_loaded_rows(self, rows: torch.Tensor, path: str) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- storage
    def _rows(self) -> torch.Tensor:
        """All rows as one tensor ``(N, *row_shape)``; consolidates chunks (amortised O(1))."""
        if not self._chunks:
            return torch.empty((0, *self._row_shape), dtype=self._dtype)
        if len(self._chunks) > 1:
            self._chunks = [torch.cat(self._chunks, dim=0)]
            if self._key_bytes:
                self._key_chunks = [torch.cat(self._key_chunks, dim=0)]
        return self._chunks[0]

    def _keys(self) -> torch.Tensor:
        """All compact keys ``(N, key_bytes)`` uint8, consolidated with the rows. Only for a bank with keys."""
        self._rows()
        return self._key_chunks[0] if self._key_chunks else torch.empty((0, self._key_bytes), dtype=torch.uint8)

    def _row_range(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as one contiguous tensor, copying only the chunks they span (a save that
        appends one shard must not consolidate the whole bank)."""
        return _chunk_range(self._chunks, start, stop, (0, *self._row_shape), self._dtype)

    def _key_range(self, start: int, stop: int) -> torch.Tensor:
        """Keys of rows ``[start, stop)``, ``(n, key_bytes)`` uint8, as `_row_range`."""
        return _chunk_range(self._key_chunks, start, stop, (0, self._key_bytes), torch.uint8)

    def __len__(self) -> int:
        return len(self._doc_ids)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._index

    @property
    def num_tokens(self) -> int:
        """``T``: number of context vectors / codes per document."""
        return self._num_tokens

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the row tensor."""
        return self._dtype

    @property
    def doc_ids(self) -> list[str]:
        """Copy of the stored document ids, in row order."""
        return list(self._doc_ids)

    @property
    def metadata(self) -> list[dict]:
        """Deep copy of the per-row metadata dicts, in row order (``{}`` when none)."""
        return [copy.deepcopy(m) for m in self._meta]  # one deepcopy per row: rows never share a dict

    def get_metadata(self, doc_id: str) -> dict:
        """Deep copy of one document's metadata. Raises ``KeyError`` if absent."""
        return copy.deepcopy(self._meta[self.index_of(doc_id)])

    def index_of(self, doc_id: str) -> int:
        """Row index of ``doc_id``. Raises ``KeyError`` (naming the id) if absent."""
        try:
            return self._index[doc_id]
        except (KeyError, TypeError):
            raise KeyError(f"doc_id {doc_id!r} is not in the memory bank") from None

    def _get_rows(self, doc_ids: Sequence[str]) -> torch.Tensor:
        if isinstance(doc_ids, str):
            raise TypeError("doc_ids must be a list of str, not a single str (wrap it in a list)")
        rows = [self.index_of(d) for d in doc_ids]
        return self._rows()[torch.tensor(rows, dtype=torch.long)]

    @property
    def nbytes(self) -> int:
        """Storage size in bytes: ``numel * element_size`` of the row tensor plus
        the UTF-8 bytes of all doc ids (and the compact keys of a bank that has them).
        Metadata and Python object overhead are not counted."""
        per_row = math.prod(self._row_shape) * torch.empty((), dtype=self._dtype).element_size()
        per_row += self._key_bytes or 0
        return len(self._doc_ids) * per_row + self._id_bytes

    # --------------------------------------------------------------- mutation
    def _extend(
        self,
        doc_ids: Sequence[str],
        rows: Any,
        metadata: Sequence[dict | None] | None,
        on_duplicate: str,
        keys: Any = None,
    ) -> list[int]:
        if on_duplicate not in DUPLICATE_POLICIES:
            raise ValueError(f"on_duplicate must be one of {DUPLICATE_POLICIES}, got {on_duplicate!r}")
        if isinstance(doc_ids, str):
            raise TypeError("doc_ids must be a list of str, not a single str (use append() for one document)")
        doc_ids, meta = check_doc_ids_and_metadata(doc_ids, metadata)
        rows = self._coerce_rows(rows, doc_ids)
        keys = self._coerce_keys(keys, len(doc_ids))

        # Plan everything before mutating, so errors leave the bank untouched.
        n_old = len(self._doc_ids)
        overwrite: dict[int, int] = {}  # existing row -> input position
        new_positions: list[int] = []  # input positions of new rows
        new_slot: dict[str, int] = {}  # doc_id -> index into new_positions
        written: list[int] = []
        for pos, d in enumerate(doc_ids):
            if d in self._index or d in new_slot:
                if on_duplicate == "fail":
                    where = (
                        "is already in the memory bank" if d in self._index else "appears more than once in this call"
                    )
                    raise ValueError(f"duplicate doc_id {d!r}: it {where} (on_duplicate='fail')")
                if on_duplicate == "skip":
                    continue
                if d in self._index:
                    overwrite[self._index[d]] = pos
                    written.append(self._index[d])
                else:
                    new_positions[new_slot[d]] = pos
                    written.append(n_old + new_slot[d])
            else:
                new_slot[d] = len(new_positions)
                new_positions.append(pos)
                written.append(n_old + new_slot[d])

        if overwrite:
            targets = torch.tensor(list(overwrite.keys()), dtype=torch.long)
            sources = torch.tensor(list(overwrite.values()), dtype=torch.long)
            updated = self._rows().clone()  # copy-on-write: never mutate handed-out tensors
            # torch has no index_put for uint16: write through a same-width signed bit view.
            view_dtype = _SIGNED_VIEW.get(updated.dtype, updated.dtype)
            updated.view(view_dtype)[targets] = rows[sources].view(view_dtype)
            self._chunks = [updated]
            if self._key_bytes:
                updated_keys = self._keys().clone()
                updated_keys[targets] = keys[sources]
                self._key_chunks = [updated_keys]
            for r, pos in overwrite.items():
                self._meta[r] = meta[pos]
            self._note_overwritten(list(overwrite))
            self._invalidate()
        if new_positions:
            positions = torch.tensor(new_positions, dtype=torch.long)
            added = rows[positions].contiguous()
            for pos in new_positions:
                d = doc_ids[pos]
                self._index[d] = len(self._doc_ids)
                self._doc_ids.append(d)
                self._meta.append(meta[pos])
                self._id_bytes += len(d.encode("utf-8"))
            self._chunks.append(added)
            if self._key_bytes:
                self._key_chunks.append(keys[positions].contiguous())
            self._rows_appended(added)
            # Merge trailing chunks of similar size (a binary counter): O(log N) chunks stay between reads, so a
            # long stream of small extends does not keep one tensor (with its per-tensor overhead) per call.
            while len(self._chunks) > 1 and self._chunks[-2].shape[0] <= 2 * self._chunks[-1].shape[0]:
                last = self._chunks.pop()
                self._chunks[-1] = torch.cat([self._chunks[-1], last], dim=0)
                if self._key_bytes:
                    last = self._key_chunks.pop()
                    self._key_chunks[-1] = torch.cat([self._key_chunks[-1], last], dim=0)
        if self._sync is not None:
            self._changed.update(self._doc_ids[r] for r in written)
            self._removed.difference_update(self._doc_ids[r] for r in written)
        return written

    def _append(self, doc_id: str, row: Any, metadata: dict | None, on_duplicate: str, key: Any = None
                ) -> int | None:
        row = torch.as_tensor(row)
        key = None if key is None else torch.as_tensor(key).reshape(1, -1)
        written = self._extend([doc_id], row.reshape(1, *row.shape), [metadata], on_duplicate, key)
        return written[0] if written else None

    def _coerce_keys(self, keys: Any, n: int) -> torch.Tensor | None:
        """Check the compact keys of n new rows: required (uint8 (n, key_bytes)) for a bank with keys, refused for
        a bank without. Raises ``ValueError`` / ``TypeError`` naming the problem and the fix."""
        if not self._key_bytes:
            if keys is not None:
                raise ValueError("this memory bank stores no compact keys, but keys were given: build the bank with "
                                 "key_bytes=... (a model with addressing_key set does), or leave keys out.")
            return None
        if keys is None:
            raise ValueError(f"this memory bank stores a {self._key_bytes}-byte compact key per document "
                             f"(key encoder {self._key_fingerprint!r}): pass keys=(n, {self._key_bytes}) uint8 with "
                             "the rows (model.memorize computes them when its config sets addressing_key).")
        keys = torch.as_tensor(keys).detach()
        if keys.dtype != torch.uint8:
            raise TypeError(f"keys must be uint8 packed sign bits, got dtype {keys.dtype}: binarise float embeddings "
                            "first (mbc_hf.compact_key.binarize).")
        if keys.dim() != 2 or tuple(keys.shape) != (n, self._key_bytes):
            raise ValueError(f"keys must have shape (n={n}, key_bytes={self._key_bytes}), got {tuple(keys.shape)}: "
                             f"this bank's keys are {self._key_bytes * 8}-bit; compute them with the bank's key "
                             "encoder.")
        return keys.cpu().contiguous()

    def remove(self, doc_ids: str | Sequence[str]) -> None:
        """Remove documents: ``doc_ids`` is one id or a list of ids (an id listed twice is removed once).

        One pass over the bank whatever the number of ids, O(N + n) for n ids, in vectorised copies: remove many
        documents in ONE call (a loop of single removes costs O(N) each; rows keep their order, so a removal
        shifts every later row).

        Raises:
            KeyError: naming the first id that is not in the bank; nothing is removed.
        """
        ids = [doc_ids] if isinstance(doc_ids, str) else list(doc_ids)
        gone = sorted({self.index_of(d) for d in ids})
        if not gone:
            return
        self._note_removed(gone)
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[gone] = False
        rows = self._rows()[keep]
        self._chunks = [rows] if rows.shape[0] else []
        if self._key_bytes:
            keys = self._keys()[keep]
            self._key_chunks = [keys] if keys.shape[0] else []
        spans = list(zip([0] + [r + 1 for r in gone], gone + [len(self)]))  # the kept runs of rows
        for d in (self._doc_ids[r] for r in gone):
            del self._index[d]
            self._id_bytes -= len(d.encode("utf-8"))
        self._doc_ids = list(itertools.chain.from_iterable(self._doc_ids[a:b] for a, b in spans))
        self._meta = list(itertools.chain.from_iterable(self._meta[a:b] for a, b in spans))
        self._index.update(zip(self._doc_ids[gone[0]:], range(gone[0], len(self._doc_ids))))
        self._invalidate()

    # ------------------------------------------------------------ persistence
    def _payload(self) -> dict[str, str]:
        """Header keys that every file of this bank carries (format, version, payload, T)."""
        header = {"format": self._FORMAT, "format_version": _FORMAT_VERSION}
        header.update(self._payload_header())
        header["num_tokens"] = str(self._num_tokens)
        return header

    def save(self, path: str | os.PathLike, shard_rows: int = SHARD_ROWS) -> None:
        """Write the bank atomically, as ONE ``.safetensors`` file or, for a ``path`` ending in ``.index.json``, as
        safetensors shards of at most ``shard_rows`` rows beside a JSON index (as ``model.safetensors.index.json``).
        A ``path`` that is a symbolic link is resolved first: the file it points to is written and the link stays
        (as editors and SQLite do), so writers through the link and through the target share one bank and lock.

        Format (version 2): each file holds the rows (``codes`` / ``vectors``, storage dtype), the doc ids and,
        if any row has some, the metadata as uint8 tensors of UTF-8 JSON in the file body, so a file holds any
        number of rows; its header holds the format tag, T, the payload keys, a SHA-256 ``checksum`` of the
        tensors and a ``header_checksum`` of every other header key, checked by `load`; the index holds an
        ``index_checksum`` of its other fields. Version-1 files (ids in the header) stay readable.

        Every write goes to a temporary or new file that is then renamed into place (a process killed during a
        save leaves the previous bank complete; a failed save deletes the shards it wrote). The save runs under
        ``<path>.lock`` (`filelock`, the lock ``mbc-hf adapt`` takes). Saving again to the path this bank was
        loaded from or last saved to writes only what changed: for a sharded bank, the added rows as a new shard
        (merged with a small last shard, so a stream of appends keeps O(log N) shards), rewrites of the shards
        holding overwritten rows and of shards deleted or replaced on disk since, and removed rows as tombstones
        in the index (`compact` rewrites them away). If another writer saved to that path in the meantime, the
        bank is merged first: the file's current content plus this bank's additions, overwrites and removals
        since it was loaded (this bank's version wins for ids both changed), and this bank then holds the merged
        content. Saving to any other path replaces what is there.

        A save deletes only shard files superseded by it: named by the memory bank index it replaces (one that
        loads as a bank of this kind), with the checksum that index lists, and named by no other ``*.index.json``
        in the folder; never another file, whatever an index names.

        Raises:
            FileNotFoundError: the parent directory does not exist (it is not created).
            IsADirectoryError: ``path`` is a directory.
            ValueError: ``shard_rows`` is not a positive int, or ``path`` now holds a bank of another codebook,
                T or format than the one this bank was loaded from (it was replaced since; nothing is written).
            OSError: a file could not be written (a full disk), naming it; the bank on disk is as before.
        """
        shard_rows = _positive_int(shard_rows, "shard_rows")
        path = os.path.realpath(os.fspath(path))
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                errno.ENOENT, f"cannot save memory bank: directory {directory!r} does not exist", path
            )
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "cannot save memory bank over a directory", path)
        with bank_lock(path):
            linked = self._sync is not None and self._sync.path == path
            if linked and os.path.exists(path) and _disk_token(path) != self._sync.token:
                self._merge_from_disk(path)  # another writer saved since we loaded: take theirs, redo ours
            if path.endswith(INDEX_SUFFIX):
                self._save_sharded(path, shard_rows, (self._sync.shards or []) if linked else [])
            else:
                header = _write_bank_file(path, self._shard_tensors(0, len(self)),
                                          dict(self._payload(), num_documents=str(len(self))))
                self._sync = _Sync(path, header["header_checksum"], None)
            self._changed, self._removed = set(), set()

    def compact(self, shard_rows: int = SHARD_ROWS) -> None:
        """Rewrite the sharded bank this bank was loaded from or saved to without its tombstones and small
        shards (full shards of ``shard_rows`` rows), deleting the shard files the index no longer names (as
        `save`) and the strays of killed writes: files ``<stem>-<16 hex>.safetensors`` that no index in the
        folder names and the temporary files of this bank's writes (``.<stem>...tmp``). O(N).

        Raises:
            ValueError: the bank is not linked to a sharded bank (``.index.json``) by `load` or `save`,
                ``shard_rows`` is not a positive int, or the path now holds another codebook's bank (as `save`).
            OSError: a file could not be written, naming it; the bank on disk is as before.
        """
        shard_rows = _positive_int(shard_rows, "shard_rows")
        if self._sync is None or self._sync.shards is None:
            raise ValueError("compact() needs a bank loaded from or saved to an .index.json path; a single-file "
                             "bank has no tombstones (save() rewrites it whole)")
        path = self._sync.path
        with bank_lock(path):
            if os.path.exists(path) and _disk_token(path) != self._sync.token:
                self._merge_from_disk(path)
            self._save_sharded(path, shard_rows, [], compact=True)  # every row is written anew
            self._changed, self._removed = set(), set()

    def _shard_tensors(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The version-2 tensors of rows ``[start, stop)``: rows, doc ids and (if any) metadata."""
        tensors = {self._TENSOR_NAME: self._row_range(start, stop),
                   "doc_ids": _json_tensor(self._doc_ids[start:stop])}
        if self._key_bytes:
            tensors["keys"] = self._key_range(start, stop)
        meta = self._meta[start:stop]
        if any(meta):
            tensors["metadata"] = _json_tensor(meta)
        return tensors

    def _save_sharded(self, path: str, shard_rows: int, persisted: list[dict], compact: bool = False) -> None:
        """Write the index at ``path`` over the ``persisted`` shards (as `_Sync.shards`) that are still on disk
        unchanged, rewriting the dirty ones and writing the rows after them as new shards; then delete what
        `save` / `compact` say."""
        directory, stem = os.path.dirname(path), os.path.basename(path)[: -len(INDEX_SUFFIX)]
        old = _index_shards(path, self._FORMAT)  # the shards of the index being replaced: may be deleted after
        shards = [dict(s) for s in persisted]
        for s in shards:  # deleted, moved or replaced since this bank last saw it: write its rows again
            if _file_header(os.path.join(directory, s["file"])).get("checksum") != s["checksum"]:
                s["dirty"] = True
        tail_start = sum(s["live"] for s in shards)
        # Merge trailing shards that are not much larger than what is added (a binary counter): O(log N) shards.
        while shards and shards[-1]["rows"] <= 2 * (len(self) - tail_start) \
                and shards[-1]["live"] + len(self) - tail_start <= shard_rows:
            tail_start -= shards.pop()["live"]
        written: list[str] = []

        def write_shard(start: int, stop: int) -> dict:
            name = f"{stem}-{uuid.uuid4().hex[:16]}.safetensors"
            written.append(name)
            header = _write_bank_file(os.path.join(directory, name), self._shard_tensors(start, stop),
                                      dict(self._payload(), num_documents=str(stop - start)))
            return {"file": name, "rows": stop - start, "live": stop - start, "checksum": header["checksum"],
                    "tombstones": [], "dirty": False}

        try:
            start = 0
            for s in shards:  # rewrite the shards that hold overwritten rows, with their tombstones dropped
                if s["dirty"]:
                    s.update(write_shard(start, start + s["live"]))
                start += s["live"]
            for lo in range(tail_start, len(self), shard_rows):
                shards.append(write_shard(lo, min(lo + shard_rows, len(self))))
            index = dict(self._payload(), num_documents=len(self),
                         shards=[{"file": s["file"], "rows": s["rows"], "checksum": s["checksum"]} for s in shards],
                         tombstones={s["file"]: s["tombstones"] for s in shards if s["tombstones"]})
            index["index_checksum"] = _fields_checksum(index, "index_checksum")
            text = json.dumps(index, ensure_ascii=False, indent=1)
            _write(path, lambda tmp: open(tmp, "w", encoding="utf-8").write(text))
        except BaseException:  # the index was not replaced: the shards of this save are orphans
            for name in written:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
            raise
        self._sync = _Sync(path, hashlib.sha256(text.encode("utf-8")).hexdigest(), shards)
        keep = {s["file"] for s in shards}
        stale = {f for f, checksum in old.items()
                 if f not in keep and _file_header(os.path.join(directory, f)).get("checksum") == checksum}
        if compact:
            own = re.escape(stem) + "-" + _SHARD_NAME.pattern
            stale |= {f for f in os.listdir(directory) if re.fullmatch(own, f)} - keep
            stale |= set(temporary_files(directory, f"{own}|{re.escape(os.path.basename(path))}"))
        if stale:
            for name in stale - _files_of_other_indexes(directory, path):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))

    def _merge_from_disk(self, path: str) -> None:
        """Replace this bank's content by the bank at ``path`` plus this bank's changes since it was synced.
        Raises ``ValueError`` if that bank is not of this bank's codebook, T and format (nothing changes)."""
        disk = type(self).load(path)
        if disk._payload() != self._payload():
            differ = ", ".join(f"{k} {v!r} (this bank: {self._payload().get(k)!r})"
                               for k, v in disk._payload().items() if self._payload().get(k) != v)
            raise ValueError(f"{path} was replaced since this bank was loaded from it by a bank with {differ}; "
                             "merging would mix codes of two codebooks under one fingerprint, so nothing was "
                             "written. Fix: save this bank to another path, or load the new bank and add the "
                             "documents to it again")
        disk.remove([d for d in self._removed if d in disk])
        changed = [d for d in self._doc_ids if d in self._changed]
        if changed:
            rows = [self._index[d] for d in changed]
            rows = torch.tensor(rows, dtype=torch.long)
            disk._extend(changed, self._rows()[rows], [self._meta[r] for r in rows.tolist()], "overwrite",
                         self._keys()[rows] if self._key_bytes else None)
        self.__dict__.update(disk.__dict__)

    # bookkeeping of what changed since the last load / save (for incremental and merging saves)
    def _note_overwritten(self, rows: list[int]) -> None:
        if self._sync is not None and self._sync.shards is not None:
            starts = self._shard_starts()
            for r in rows:
                k = bisect.bisect_right(starts, r) - 1
                if k < len(self._sync.shards):
                    self._sync.shards[k]["dirty"] = True

    def _note_removed(self, rows: list[int]) -> None:
        """Record the removal of ``rows`` (row numbers before the removal), as tombstones of their shards."""
        ids = [self._doc_ids[r] for r in rows]
        self._changed.difference_update(ids)
        if self._sync is None:
            return
        self._removed.update(ids)
        if self._sync.shards is not None:
            starts = self._shard_starts()
            for row, doc_id in zip(rows, ids):
                k = bisect.bisect_right(starts, row) - 1
                if k < len(self._sync.shards):
                    shard = self._sync.shards[k]
                    shard["live"] -= 1
                    shard["tombstones"].append(doc_id)

    def _shard_starts(self) -> list[int]:
        """First in-memory row of each persisted shard, then the first row not yet persisted."""
        return list(itertools.accumulate((s["live"] for s in self._sync.shards), initial=0))

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Load a bank written by :meth:`save`: one ``.safetensors`` file (format version 1 or 2) or, for a path
        ending in ``.index.json``, the shards its index names (safetensors and JSON only, never pickle).

        Each file is read once, through one open file, into memory (transiently about twice its size), so loading
        while another process saves gives either the old or the new bank, never a mix. Checksums are verified.

        A sharded bank's index is checked whole before any shard is read (its checksum, shard names that stay in
        its folder and appear once, tombstones, ``num_documents``), so a hostile index costs no more than its own
        size. If a writer replaces the index and deletes a shard the old one named while the shards are read, the
        load starts again from the new index (up to 10 times). A symbolic link ``path`` is resolved (as `save`).

        Raises ``FileNotFoundError`` if ``path`` (or a shard) does not exist, and ``ValueError`` naming the file
        and the problem when it is truncated, corrupted (checksum mismatch, of the data or of the header), has a
        forged header, the wrong format tag or version, missing/garbled keys, a row tensor of the wrong
        dtype/shape or out-of-range values, duplicate / invalid doc ids, or (an index) malformed, duplicate or
        escaping shard entries, malformed tombstones or a ``num_documents`` that is not the number of rows.
        """
        path = os.path.realpath(os.fspath(path))
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "memory bank file not found", path)
        if path.endswith(INDEX_SUFFIX):
            return cls._load_sharded(path)
        header, tensors = _read_safetensors(path)
        bank = cls._bank_for(header, path)
        bank._fill(path, *_parse_bank_file(header, tensors, bank._TENSOR_NAME, path, bank._key_bytes))
        bank._sync = _Sync(path, _token(header), None)
        return bank

    @classmethod
    def _bank_for(cls, header: dict[str, str], path: str) -> "_DocRowBank":
        fmt = header.get("format")
        if cls is _DocRowBank:  # load_bank(): the class the file names
            cls = next((c for c in _DocRowBank.__subclasses__() if c._FORMAT == fmt), cls)
        if fmt is None or cls is _DocRowBank:
            tags = " or ".join(repr(c._FORMAT) for c in _DocRowBank.__subclasses__())
            found = "has no format tag" if fmt is None else f"has the format tag {fmt!r}"
            raise ValueError(f"{path}: {found}, but a memory bank's is {tags}: it is not a memory bank file "
                             "(or its header was damaged; restore it from a backup)")
        if fmt != cls._FORMAT:
            hint = ""
            for other in _DocRowBank.__subclasses__():
                if fmt == other._FORMAT:
                    hint = f"; it is a {other.__name__}, load it with {other.__name__}.load()"
            raise ValueError(f"{path}: format tag is {fmt!r}, expected {cls._FORMAT!r}{hint}")
        if header.get("format_version") not in _READABLE_VERSIONS:
            raise ValueError(
                f"{path}: unsupported format_version {header.get('format_version')!r} "
                f"(this code reads versions {', '.join(_READABLE_VERSIONS)}); upgrade mbc-hf to read it"
            )
        return cls._from_header(header, path)

    def _fill(self, path: str, rows: torch.Tensor, doc_ids: list[str], meta: list[dict],
              keys: torch.Tensor | None = None) -> None:
        if rows.dim() != 1 + len(self._row_shape) or tuple(rows.shape[1:]) != self._row_shape:
            raise ValueError(
                f"{path}: tensor {self._TENSOR_NAME!r} has shape {tuple(rows.shape)}, "
                f"expected (N, {', '.join(map(str, self._row_shape))})"
            )
        if rows.shape[0] != len(doc_ids):
            raise ValueError(f"{path}: tensor {self._TENSOR_NAME!r} has {rows.shape[0]} rows but the file lists "
                             f"{len(doc_ids)} doc_ids")
        rows = self._check_loaded_rows(rows, path)
        index = {d: i for i, d in enumerate(doc_ids)}
        if len(index) != len(doc_ids):
            seen: set[str] = set()
            dup = next(d for d in doc_ids if d in seen or seen.add(d))
            raise ValueError(f"{path}: duplicate doc_id {dup!r}")
        self._doc_ids, self._index, self._meta = doc_ids, index, meta
        self._id_bytes = sum(len(d.encode("utf-8")) for d in doc_ids)
        self._chunks = [rows.contiguous()] if len(doc_ids) else []
        self._key_chunks = [keys.contiguous()] if self._key_bytes and len(doc_ids) else []
        self._invalidate()

    @classmethod
    def _load_sharded(cls, path: str) -> "_DocRowBank":
        attempts = _LOAD_ATTEMPTS
        while True:
            raw, index = _read_index(path)
            try:
                return cls._load_index(path, raw, index)
            except FileNotFoundError:  # a shard is gone: retry if a writer replaced the index since it was read
                attempts -= 1
                if not attempts or _disk_token(path) == hashlib.sha256(raw).hexdigest():
                    raise

    @classmethod
    def _load_index(cls, path: str, raw: bytes, index: dict) -> "_DocRowBank":
        tombstones = _check_index(path, index)
        bank = cls._bank_for({k: v for k, v in index.items() if isinstance(v, str)}, path)
        directory = os.path.dirname(path)
        parts, key_parts, doc_ids, meta, shards = [], [], [], [], []
        for entry in index["shards"]:
            shard_path = os.path.join(directory, entry["file"])
            try:
                shard_header, tensors = _read_safetensors(shard_path)
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, f"memory bank shard named by {path} is missing (restore it "
                                        "from a backup; the index cannot be loaded without it)", shard_path) from None
            bank._bank_for(shard_header, shard_path)
            rows, ids, m, keys = _parse_bank_file(shard_header, tensors, bank._TENSOR_NAME, shard_path,
                                                  bank._key_bytes)
            if shard_header.get("checksum") != entry["checksum"] or len(ids) != entry["rows"]:
                raise ValueError(f"{shard_path}: does not match its entry in {path} (checksum or row count "
                                 "differs): the shard was replaced or the index is stale")
            if {k: shard_header.get(k) for k in bank._payload()} != bank._payload():
                raise ValueError(f"{shard_path}: its format, T or codebook differ from the index {path}")
            dead = tombstones.get(entry["file"], set())
            if dead:
                if not dead <= set(ids):
                    raise ValueError(f"{path}: tombstones of {entry['file']} name ids the shard does not hold")
                keep = [i for i, d in enumerate(ids) if d not in dead]
                rows, ids, m = rows[torch.tensor(keep, dtype=torch.long)], [ids[i] for i in keep], \
                    [m[i] for i in keep]
                keys = None if keys is None else keys[torch.tensor(keep, dtype=torch.long)]
            parts.append(rows)
            key_parts.append(keys)
            doc_ids += ids
            meta += m
            shards.append({"file": entry["file"], "rows": entry["rows"], "live": len(ids),
                           "checksum": entry["checksum"], "tombstones": sorted(dead), "dirty": False})
        rows = torch.cat(parts) if parts else torch.empty((0, *bank._row_shape), dtype=bank._dtype)
        keys = torch.cat(key_parts) if bank._key_bytes and key_parts else None
        bank._fill(path, rows, doc_ids, meta, keys)
        bank._sync = _Sync(path, hashlib.sha256(raw).hexdigest(), shards)
        return bank


# ---------------------------------------------------------------- file format helpers
@dataclasses.dataclass
class _Sync:
    """The file a bank was last loaded from or saved to: its path, a token of its content then (a checksum), and
    for a sharded bank its shards (file, rows in the file, live rows, checksum, tombstones, dirty)."""

    path: str
    token: str | None
    shards: list[dict] | None


_LOCKS: dict[str, Any] = {}


def bank_lock(path: str | os.PathLike):
    """The inter-process lock of a bank file: a `filelock.FileLock` on ``<path>.lock``, one object per path in a
    process (so nested use is re-entrant, as `mbc-hf adapt` holding it around `save`); a symbolic link is
    resolved first, as `save` does."""
    from filelock import FileLock

    path = os.path.realpath(os.fspath(path))  # one lock for a bank reached through a symbolic link and directly
    if path not in _LOCKS:
        _LOCKS[path] = FileLock(path + ".lock")
    return _LOCKS[path]


def _chunk_range(chunks: list[torch.Tensor], start: int, stop: int, empty_shape: tuple, dtype: torch.dtype
                 ) -> torch.Tensor:
    """Rows ``[start, stop)`` of consecutive row blocks as one contiguous tensor, copying only the blocks they
    span."""
    parts, offset = [], 0
    for chunk in chunks:
        lo, hi = max(start - offset, 0), min(stop - offset, chunk.shape[0])
        if lo < hi:
            parts.append(chunk[lo:hi])
        offset += chunk.shape[0]
    if not parts:
        return torch.empty(empty_shape, dtype=dtype)
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)


def _json_tensor(value: Any) -> torch.Tensor:
    data = json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and bytes of ``tensors``, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _fields_checksum(fields: dict, own_key: str) -> str:
    """SHA-256 (hex) of the canonical JSON of ``fields`` without ``own_key`` (the key that stores it)."""
    rest = {k: v for k, v in fields.items() if k != own_key}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _token(header: dict[str, str]) -> str | None:
    """A file's content token (`_Sync.token`): its header checksum, else (older files) its tensor checksum."""
    return header.get("header_checksum") or header.get("checksum")


def _write(path: str, write) -> None:
    """`atomic_write`, raising a failure (a full disk: ``OSError`` or ``SafetensorError``) as an ``OSError`` that
    names the file."""
    try:
        atomic_write(path, write)
    except (OSError, safetensors.SafetensorError) as exc:
        raise OSError(getattr(exc, "errno", None) or errno.EIO,
                      f"cannot write memory bank file ({exc}); the bank on disk is as it was before this save: "
                      "free disk space, or save to another path", path) from exc


def _write_bank_file(path: str, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> dict[str, str]:
    """Write one bank file (a bank or a shard) with its checksums added to ``header``; returns the header."""
    header = dict(header, checksum=_checksum(tensors))
    header["header_checksum"] = _fields_checksum(header, "header_checksum")
    _write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=header))
    return header


def _file_header(path: str) -> dict[str, str]:
    """The metadata header of the safetensors file at ``path`` ({} if there is none or it is unreadable)."""
    with contextlib.suppress(Exception), safetensors.safe_open(path, "pt") as fh:
        return fh.metadata() or {}
    return {}


def _disk_token(path: str) -> str | None:
    """The content token of the bank at ``path`` (as `_Sync.token`): the index's SHA-256, or a file's `_token`
    (None for a version-1 file); None if there is no file."""
    if not os.path.exists(path):
        return None
    if path.endswith(INDEX_SUFFIX):
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    return _token(_file_header(path))


def _read_index(path: str) -> tuple[bytes, dict]:
    """The bytes and the JSON object of a sharded bank's index. Raises ``ValueError`` naming the file if it is
    not a JSON object with a ``shards`` list (nested too deeply included), ``OSError`` if it cannot be read."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        index = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        problem = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise ValueError(f"{path}: not a memory bank index: not valid JSON ({problem})") from None
    if not (isinstance(index, dict) and isinstance(index.get("shards"), list)):
        raise ValueError(f"{path}: not a memory bank index (a JSON object with a 'shards' list)")
    return raw, index


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_index(path: str, index: dict) -> dict[str, set[str]]:
    """Check a sharded bank's index before any shard is read; return its tombstones (doc ids per shard file).
    Raises ``ValueError`` naming the index and the problem."""
    restore = "restore the index from a backup"
    if "index_checksum" in index and index["index_checksum"] != _fields_checksum(index, "index_checksum"):
        raise ValueError(f"{path}: index checksum mismatch: the index was changed or damaged after it was written "
                         f"({restore})")
    directory, files = os.path.dirname(path), set()
    for entry in index["shards"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and _SHARD_FILE.fullmatch(
                entry["file"]) and _count(entry.get("rows")) and isinstance(entry.get("checksum"), str)):
            raise ValueError(f"{path}: malformed shard entry {str(entry)[:200]} (a shard entry is "
                             "{'file': '<stem>-<16 hex>.safetensors', 'rows': int, 'checksum': str}); " + restore)
        name = entry["file"]
        if name in files:
            raise ValueError(f"{path}: names the shard {name!r} twice ({restore})")
        files.add(name)
        shard = os.path.join(directory, name)
        if os.path.islink(shard) and os.path.dirname(os.path.realpath(shard)) != directory:
            raise ValueError(f"{path}: shard {name!r} is a symbolic link out of the bank's folder {directory}; "
                             "a bank's shards are files beside its index (copy the file there instead)")
    tombstones = index.get("tombstones", {})
    if not isinstance(tombstones, dict):
        raise ValueError(f"{path}: 'tombstones' must map shard files to lists of doc ids, got "
                         f"{type(tombstones).__name__} ({restore})")
    dead = {}
    for name, ids in tombstones.items():
        if name not in files:
            raise ValueError(f"{path}: tombstones name the shard {name!r}, which the index does not list ({restore})")
        if not isinstance(ids, list) or not all(isinstance(d, str) for d in ids):
            raise ValueError(f"{path}: tombstones of {name!r} must be a list of doc id strings, got "
                             f"{str(ids)[:100]} ({restore})")
        dead[name] = set(ids)
    live = sum(e["rows"] for e in index["shards"]) - sum(map(len, dead.values()))
    if not _count(index.get("num_documents")) or index["num_documents"] != live:
        raise ValueError(f"{path}: num_documents is {index.get('num_documents')!r} but the shard entries hold {live} "
                         f"live rows: the index lost a shard entry or was edited ({restore})")
    return dead


def _index_shards(path: str, fmt: str) -> dict[str, str]:
    """``{shard file: checksum}`` of the index at ``path`` if it is a valid index of a bank of format ``fmt``, else
    ``{}``: a foreign, forged or damaged file names nothing that a save may delete."""
    with contextlib.suppress(OSError, ValueError):
        _, index = _read_index(path)
        if index.get("format") == fmt:
            _check_index(path, index)
            return {e["file"]: e["checksum"] for e in index["shards"]}
    return {}


def _files_of_other_indexes(directory: str, path: str) -> set[str]:
    """Every file named as a shard by an ``*.index.json`` in ``directory`` other than ``path`` (read leniently: a
    copy of an index or another bank keeps its shards even if it is damaged)."""
    names: set[str] = set()
    for f in os.listdir(directory):
        other = os.path.join(directory, f)
        if f.endswith(INDEX_SUFFIX) and other != path:
            with contextlib.suppress(OSError, ValueError):
                names.update(e["file"] for e in _read_index(other)[1]["shards"]
                             if isinstance(e, dict) and isinstance(e.get("file"), str))
    return names


def _read_safetensors(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header, tensors) of one safetensors file, read through ONE open file: a concurrent save() replaces the path
    with a new file (os.replace), and safe_open reads the tensor data by reopening the path, so it could combine
    the old header with the new file's bytes."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        tensors = safetensors.torch.load(data)
        (header_length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_length]).get("__metadata__")
    except FileNotFoundError:
        raise
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError, RecursionError, struct.error) as exc:
        raise ValueError(
            f"{path}: not a readable safetensors file (truncated, corrupted or forged header): {exc}"
        ) from exc
    if header is not None and not (isinstance(header, dict) and all(isinstance(v, str) for v in header.values())):
        raise ValueError(f"{path}: safetensors metadata header must map str to str")
    if not header:
        raise ValueError(f"{path}: safetensors file has no metadata header; it is not a memory bank")
    if "header_checksum" in header and header["header_checksum"] != _fields_checksum(header, "header_checksum"):
        raise ValueError(f"{path}: header checksum mismatch: the file's header (format, T, codebook size or "
                         "fingerprint, ...) was changed or damaged after it was written (restore it from a backup "
                         "or re-adapt its documents)")
    return header, tensors


def _parse_bank_file(header: dict[str, str], tensors: dict[str, torch.Tensor], name: str, path: str,
                     key_bytes: int | None = None) -> tuple[torch.Tensor, list[str], list[dict], torch.Tensor | None]:
    """Rows, doc ids, metadata and compact keys of one bank file of format version 1 (ids in the header) or 2 (ids
    in the body; its checksum verified). ``key_bytes``: the bank's key width (its header's ``key_bytes``), None for
    a bank without keys; the keys are then None."""
    if header["format_version"] == "1":
        doc_ids = _json_field(header, "doc_ids", path)
        meta = _json_field(header, "metadata", path) if "metadata" in header else None
        expected = {name}
    else:
        if "checksum" not in header:
            raise ValueError(f"{path}: header key 'checksum' is missing")
        if header["checksum"] != _checksum(tensors):
            raise ValueError(f"{path}: checksum mismatch: the file's data was changed or damaged after it was "
                             "written (restore it from a backup or re-adapt its documents)")
        expected = {name, "doc_ids"} | ({"metadata"} if "metadata" in tensors else set()) \
            | ({"keys"} if key_bytes else set())
        if set(tensors) != expected:
            raise ValueError(f"{path}: expected the tensors {sorted(expected)}, found {sorted(tensors)}")
        doc_ids = _json_body(tensors, "doc_ids", path)
        meta = _json_body(tensors, "metadata", path) if "metadata" in tensors else None
        if isinstance(doc_ids, list) and header.get("num_documents", str(len(doc_ids))) != str(len(doc_ids)):
            raise ValueError(f"{path}: header key 'num_documents' is {header['num_documents']!r} but the file "
                             f"holds {len(doc_ids)} doc ids")
    if set(tensors) != expected:
        raise ValueError(f"{path}: expected exactly one tensor named {name!r}, found {sorted(tensors)}")
    if not isinstance(doc_ids, list) or not all(isinstance(d, str) and d for d in doc_ids):
        raise ValueError(f"{path}: 'doc_ids' must be a JSON list of non-empty str")
    if meta is None:
        meta = [_NO_METADATA] * len(doc_ids)
    else:
        if not isinstance(meta, list) or not all(isinstance(m, dict) for m in meta):
            raise ValueError(f"{path}: 'metadata' must be a JSON list of objects")
        if len(meta) != len(doc_ids):
            raise ValueError(f"{path}: {len(meta)} metadata entries for {len(doc_ids)} doc_ids")
        meta = [m or _NO_METADATA for m in meta]
    keys = None
    if key_bytes:
        keys = tensors["keys"]
        if keys.dtype != torch.uint8 or tuple(keys.shape) != (len(doc_ids), key_bytes):
            raise ValueError(f"{path}: tensor 'keys' has dtype {keys.dtype} and shape {tuple(keys.shape)}, expected "
                             f"uint8 ({len(doc_ids)}, {key_bytes}): one compact key per doc id")
    return tensors[name], doc_ids, meta, keys


def _json_body(tensors: dict[str, torch.Tensor], key: str, path: str) -> Any:
    t = tensors.get(key)
    if t is None or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{path}: tensor {key!r} (uint8, UTF-8 JSON) is missing or malformed")
    try:
        return json.loads(t.numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: tensor {key!r} is not UTF-8 JSON (or is nested too deeply): {exc}") from exc


def _json_field(header: dict[str, str], key: str, path: str) -> Any:
    if key not in header:
        raise ValueError(f"{path}: header key {key!r} is missing")
    try:
        return json.loads(header[key])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: header key {key!r} is not valid JSON (or is nested too deeply): {exc}") from exc


def _int_field(header: dict[str, str], key: str, path: str) -> int:
    if key not in header:
        raise ValueError(f"{path}: header key {key!r} is missing")
    try:
        value = int(header[key])
    except ValueError:
        value = 0
    if value < 1 or str(value) != header[key]:
        raise ValueError(f"{path}: header key {key!r} must be a positive integer, got {header[key]!r}")
    return value


def _codes_dtype(codebook_size: int) -> torch.dtype:
    """Smallest unsigned dtype holding every code in ``[0, codebook_size)``."""
    if codebook_size <= 256:
        return torch.uint8
    if codebook_size <= 65536:
        return torch.uint16
    raise ValueError(
        f"codebook_size {codebook_size} > 65536 is not supported (codes are stored as uint8/uint16)"
    )


def _first_out_of_range(codes: torch.Tensor, codebook_size: int) -> tuple[int, int, int] | None:
    """First ``(row, position, value)`` with value outside ``[0, K)``, or None.

    Works chunk-wise in int64 because torch lacks comparisons for uint16/uint32.
    """
    if codes.numel() == 0:
        return None
    rows_per_chunk = max(1, _COUNT_CHUNK_ELEMENTS // max(1, codes.shape[1]))
    for start in range(0, codes.shape[0], rows_per_chunk):
        block = codes[start : start + rows_per_chunk].to(torch.int64)
        bad = (block < 0) | (block >= codebook_size)
        if bool(bad.any()):
            r, t = (int(x) for x in bad.nonzero()[0])
            return start + r, t, int(block[r, t])
    return None


class CompressedMemoryBank(_DocRowBank):
    """The MBC memory bank: ``T`` codebook indices per unique document.

    Args:
        codebook_size: ``K``, number of codebook entries; codes lie in ``[0, K)``.
        num_tokens: ``T``, context vectors (hence codes) per document.
        codebook_fingerprint: non-empty string identifying the model's codebook
            (computed and owned by the model).
        key_bytes: ``None`` (default): no compact keys, the bank addresses by its
            codes alone; an int W: every row also stores a W-byte compact key,
            uint8 ``(N, W)`` (``mbc_hf.compact_key``: 48 bytes, the sign bits of a
            384-dim sentence embedding), given to ``extend(..., keys=...)``, saved in
            every file / shard beside the codes (tensor ``"keys"``, covered by the
            checksum; header keys ``key_bytes``, ``key_fingerprint``) and kept
            aligned with the rows by append, overwrite, remove and merge. Files
            without keys (all files written before keys existed) load as banks
            without keys.
        key_fingerprint: non-empty string identifying the key encoder (required
            with ``key_bytes``): keys compare only with questions embedded by it.

    Storage: ``codes`` ``(N, T)`` in :attr:`dtype` -- ``torch.uint8`` if
    ``K <= 256``, ``torch.uint16`` if ``K <= 65536`` (larger ``K`` raises
    ``ValueError``).  MBC paper Section 3 keeps ``int64`` codes per QA row; we
    keep the smallest unsigned dtype and one row per unique ``doc_id``.  Rows
    are appended as chunks, merged with chunks of similar size (O(log N)
    chunks, each row copied O(log N) times) and concatenated on read, so
    incremental ``extend`` stays cheap and bounded in overhead.

    Note: torch implements few ops for ``uint16`` (no comparisons, max, ...);
    call ``.long()`` on :attr:`codes` before arithmetic or indexing a codebook.
    """

    _FORMAT = "mbc-compressed-memory-bank"
    _TENSOR_NAME = "codes"

    def __init__(self, codebook_size: int, num_tokens: int, codebook_fingerprint: str,
                 key_bytes: int | None = None, key_fingerprint: str | None = None) -> None:
        codebook_size = _positive_int(codebook_size, "codebook_size")
        if key_bytes is not None:
            key_bytes = _positive_int(key_bytes, "key_bytes")
            if not isinstance(key_fingerprint, str) or not key_fingerprint:
                raise ValueError(f"key_fingerprint must be a non-empty str naming the key encoder when key_bytes is "
                                 f"set, got {key_fingerprint!r}")
        elif key_fingerprint is not None:
            raise ValueError("key_fingerprint without key_bytes: set key_bytes (e.g. 48) to store compact keys")
        dtype = _codes_dtype(codebook_size)
        if not isinstance(codebook_fingerprint, str) or not codebook_fingerprint:
            raise ValueError(f"codebook_fingerprint must be a non-empty str, got {codebook_fingerprint!r}")
        super().__init__(num_tokens, (num_tokens,), dtype)
        self._codebook_size = codebook_size
        self._fingerprint = codebook_fingerprint
        self._counts: torch.Tensor | None = None
        self._code_index = None  # the addressing index (`mbc_hf.addressing.bank_index`), built on first use
        self._key_bytes, self._key_fingerprint = key_bytes, key_fingerprint
        self._key_index = None  # the compact keys' FAISS index (`mbc_hf.compact_key.key_index`), built on first use

    @property
    def codebook_size(self) -> int:
        """``K``: number of codebook entries."""
        return self._codebook_size

    @property
    def codebook_fingerprint(self) -> str:
        """Fingerprint of the codebook these codes index."""
        return self._fingerprint

    @property
    def key_bytes(self) -> int | None:
        """Bytes of each row's compact key, or None for a bank without keys."""
        return self._key_bytes

    @property
    def key_fingerprint(self) -> str | None:
        """Fingerprint of the encoder the compact keys come from (None without keys)."""
        return self._key_fingerprint

    @property
    def keys(self) -> torch.Tensor | None:
        """All compact keys, ``(N, key_bytes)`` uint8 in row order (a stable snapshot, as :attr:`codes`; do not
        modify it), or None for a bank without keys."""
        return self._keys() if self._key_bytes else None

    def get_keys(self, doc_ids: Sequence[str]) -> torch.Tensor:
        """Compact keys of the given documents, ``(n, key_bytes)`` uint8 (a copy). Raises ``KeyError`` naming the
        first missing id, ``ValueError`` for a bank without keys."""
        if not self._key_bytes:
            raise ValueError("this memory bank stores no compact keys (key_bytes=None)")
        if isinstance(doc_ids, str):
            raise TypeError("doc_ids must be a list of str, not a single str (wrap it in a list)")
        return self._keys()[torch.tensor([self.index_of(d) for d in doc_ids], dtype=torch.long)]

    @property
    def codes(self) -> torch.Tensor:
        """All codes, ``(N, T)`` in :attr:`dtype`, rows in :attr:`doc_ids` order.

        Returned without copying: the bank never modifies this tensor in place
        later (mutations build new tensors), so it is a stable snapshot -- but
        do not modify it yourself."""
        return self._rows()

    def get_codes(self, doc_ids: Sequence[str]) -> torch.Tensor:
        """Codes of the given documents, ``(n, T)`` in :attr:`dtype` (a copy).
        Raises ``KeyError`` naming the first missing id."""
        return self._get_rows(doc_ids)

    def extend(
        self,
        doc_ids: Sequence[str],
        codes: torch.Tensor,
        metadata: Sequence[dict | None] | None = None,
        on_duplicate: str = "skip",
        keys: torch.Tensor | None = None,
    ) -> list[int]:
        """Add documents.

        Args:
            doc_ids: ``n`` non-empty str ids.
            codes: integer tensor ``(n, T)`` (any integer dtype/device), values in ``[0, K)``.
            metadata: optional list of ``n`` JSON-serialisable dicts (or None).
            on_duplicate: policy for ids already stored or repeated in this call:
                ``"skip"`` keeps the first/stored row, ``"overwrite"`` replaces
                codes and metadata (last occurrence wins), ``"fail"`` raises
                ``ValueError`` naming the id.
            keys: uint8 ``(n, key_bytes)`` compact keys, required for a bank with
                keys (:attr:`key_bytes`), refused (``ValueError``) for one without.

        Returns:
            The row index written for each input document that was not
            skipped, in input order.

        Raises ``ValueError`` / ``TypeError`` for bad ids, dtype, shape, out-of-range
        codes (naming the first bad value and its row), metadata, or keys that are
        missing, not uint8 or of another width; the bank is unchanged on any error.
        """
        return self._extend(doc_ids, codes, metadata, on_duplicate, keys)

    def append(
        self,
        doc_id: str,
        codes: torch.Tensor,
        metadata: dict | None = None,
        on_duplicate: str = "skip",
        key: torch.Tensor | None = None,
    ) -> int | None:
        """Add one document with codes ``(T,)`` (and its key ``(key_bytes,)`` uint8 in a bank with keys); see
        :meth:`extend`. Returns its row index, or None if it was skipped as a duplicate."""
        return self._append(doc_id, codes, metadata, on_duplicate, key)

    def _coerce_rows(self, rows: Any, doc_ids: Sequence[str]) -> torch.Tensor:
        codes = torch.as_tensor(rows).detach()
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.dim() != 2 or codes.shape[1] != self._num_tokens or codes.shape[0] != len(doc_ids):
            raise ValueError(
                f"codes must have shape (n={len(doc_ids)}, T={self._num_tokens}), got {tuple(codes.shape)}"
            )
        codes = codes.cpu()
        bad = _first_out_of_range(codes, self._codebook_size)
        if bad is not None:
            r, t, v = bad
            raise ValueError(
                f"code {v} at row {r} (doc_id {doc_ids[r]!r}), position {t} is outside "
                f"[0, {self._codebook_size})"
            )
        return codes.to(self._dtype)

    def _check_loaded_rows(self, rows: torch.Tensor, path: str) -> torch.Tensor:
        if rows.dtype not in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
            raise ValueError(f"{path}: codes have dtype {rows.dtype}, expected an unsigned integer dtype")
        bad = _first_out_of_range(rows, self._codebook_size)
        if bad is not None:
            r, t, v = bad
            raise ValueError(
                f"{path}: code {v} at row {r}, position {t} is outside [0, {self._codebook_size})"
            )
        return rows.to(self._dtype)

    def _payload_header(self) -> dict[str, str]:
        header = {
            "codebook_size": str(self._codebook_size),
            "codebook_fingerprint": self._fingerprint,
        }
        if self._key_bytes:  # absent without keys: such files are byte-for-byte what older versions wrote
            header.update(key_bytes=str(self._key_bytes), key_fingerprint=self._key_fingerprint)
        return header

    @classmethod
    def _from_header(cls, header: dict[str, str], path: str) -> "CompressedMemoryBank":
        k = _int_field(header, "codebook_size", path)
        t = _int_field(header, "num_tokens", path)
        fp = header.get("codebook_fingerprint")
        if not fp:
            raise ValueError(f"{path}: header key 'codebook_fingerprint' is missing or empty")
        key_bytes = _int_field(header, "key_bytes", path) if "key_bytes" in header else None
        try:
            return cls(k, t, fp, key_bytes, header.get("key_fingerprint"))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike, codebook_fingerprint: str | None = None) -> "CompressedMemoryBank":
        """Load a bank saved by :meth:`save`; see ``_DocRowBank.load`` for errors.

        If ``codebook_fingerprint`` is given, also :meth:`check_codebook` it.
        """
        bank = super().load(path)
        if codebook_fingerprint is not None:
            bank.check_codebook(codebook_fingerprint)
        return bank

    # ---------------------------------------------------------------- counts
    def _rows_appended(self, rows: torch.Tensor) -> None:
        # the addressing index (`mbc_hf.addressing.bank_index`) keeps its rows: it indexes the new ones on next use
        if self._counts is not None:
            self._counts = self._counts + self._bincount(rows)

    def _invalidate(self) -> None:
        self._counts = None
        self._code_index = None
        self._key_index = None

    def _bincount(self, codes: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(self._codebook_size, dtype=torch.long)
        flat = codes.reshape(-1)
        for start in range(0, flat.numel(), _COUNT_CHUNK_ELEMENTS):
            block = flat[start : start + _COUNT_CHUNK_ELEMENTS].to(torch.int64)
            block_counts = torch.bincount(block, minlength=self._codebook_size)
            if block_counts.numel() > self._codebook_size:  # only possible after an in-place edit of `codes`
                position = start + int((block >= self._codebook_size).nonzero()[0])
                row, t = divmod(position, self._num_tokens)
                raise ValueError(
                    f"code {int(flat[position])} at row {row} (doc_id {self._doc_ids[row]!r}), position {t} is "
                    f"outside [0, {self._codebook_size}): the bank's codes tensor was modified in place; "
                    "never write into `bank.codes`, use extend(..., on_duplicate='overwrite') instead"
                )
            counts += block_counts
        return counts

    def code_counts(self) -> torch.Tensor:
        """How often each code occurs over all ``N*T`` stored codes: int64 ``(K,)``.

        Cached; updated incrementally on append, recomputed after overwrite /
        remove.  Returns a copy (safe to modify).  Raises ``ValueError`` naming
        the row if a code is ``>= K`` (possible only if :attr:`codes` was
        modified in place; ``extend`` and ``load`` refuse such codes)."""
        if self._counts is None:
            self._counts = self._bincount(self._rows())
        return self._counts.clone()

    def check_codes(self) -> None:
        """Recount every stored code (not the cache) and raise ``ValueError`` naming the row if one is ``>= K``
        (possible only if :attr:`codes` was modified in place). O(N·T); `code_counts` trusts its cache."""
        self._bincount(self._rows())

    def check_codebook(self, fingerprint: str) -> None:
        """Raise ``ValueError`` if ``fingerprint`` differs from the bank's codebook fingerprint."""
        if fingerprint != self._fingerprint:
            raise ValueError(
                "memory bank codebook mismatch: the bank's codes index the codebook with fingerprint "
                f"{self._fingerprint!r}, but this model's codebook has fingerprint {fingerprint!r}; "
                "the codes would decode to meaningless vectors. Fix: re-encode the documents with "
                "this model's memorize(), or load the model the bank was built with."
            )

    def __repr__(self) -> str:
        n = len(self)
        per_doc = self.nbytes / n if n else 0.0
        return (
            f"CompressedMemoryBank(N={n}, T={self._num_tokens}, K={self._codebook_size}, "
            f"dtype={str(self._dtype).replace('torch.', '')}, bytes/doc={per_doc:.1f}, "
            f"codebook_fingerprint={self._fingerprint!r}"
            + (f", key_bytes={self._key_bytes}, key_fingerprint={self._key_fingerprint!r})" if self._key_bytes
               else ")")
        )


_DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class DenseMemoryBank(_DocRowBank):
    """Uncompressed, MAC-style bank (VQ bypassed), for comparison with MBC.

    Args:
        num_tokens: ``T``, context vectors per document.
        hidden_size: ``d``, size of each vector.
        dtype: storage dtype, ``torch.float32`` (default), ``torch.float16`` or ``torch.bfloat16``.

    Storage: ``vectors`` ``(N, T, d)`` in :attr:`dtype`, one row per unique
    ``doc_id``; same id / duplicate / metadata / save / load behaviour as
    :class:`CompressedMemoryBank` (format tag ``"mbc-dense-memory-bank"``,
    header stores ``hidden_size``; no codebook fingerprint).
    """

    _FORMAT = "mbc-dense-memory-bank"
    _TENSOR_NAME = "vectors"

    def __init__(self, num_tokens: int, hidden_size: int, dtype: torch.dtype = torch.float32) -> None:
        hidden_size = _positive_int(hidden_size, "hidden_size")
        if dtype not in _DENSE_DTYPES:
            raise ValueError(f"dtype must be one of {_DENSE_DTYPES}, got {dtype}")
        super().__init__(num_tokens, (num_tokens, hidden_size), dtype)
        self._hidden_size = hidden_size

    @property
    def hidden_size(self) -> int:
        """``d``: size of each context vector."""
        return self._hidden_size

    @property
    def vectors(self) -> torch.Tensor:
        """All vectors, ``(N, T, d)`` in :attr:`dtype` (shared snapshot; do not modify)."""
        return self._rows()

    def get_vectors(self, doc_ids: Sequence[str]) -> torch.Tensor:
        """Vectors of the given documents, ``(n, T, d)`` (a copy). ``KeyError`` if one is missing."""
        return self._get_rows(doc_ids)

    def extend(
        self,
        doc_ids: Sequence[str],
        vectors: torch.Tensor,
        metadata: Sequence[dict | None] | None = None,
        on_duplicate: str = "skip",
    ) -> list[int]:
        """Add documents with float ``vectors`` ``(n, T, d)`` (cast to :attr:`dtype`;
        must be finite after the cast).  Duplicates, metadata, return value and
        errors as in :meth:`CompressedMemoryBank.extend`."""
        return self._extend(doc_ids, vectors, metadata, on_duplicate)

    def append(
        self,
        doc_id: str,
        vectors: torch.Tensor,
        metadata: dict | None = None,
        on_duplicate: str = "skip",
    ) -> int | None:
        """Add one document with vectors ``(T, d)``; see :meth:`extend`.
        Returns its row index, or None if it was skipped as a duplicate."""
        return self._append(doc_id, vectors, metadata, on_duplicate)

    def _coerce_rows(self, rows: Any, doc_ids: Sequence[str]) -> torch.Tensor:
        vectors = torch.as_tensor(rows).detach()
        if not vectors.is_floating_point():
            raise TypeError(f"vectors must be a floating-point tensor, got dtype {vectors.dtype}")
        expected = (len(doc_ids), *self._row_shape)
        if tuple(vectors.shape) != expected:
            raise ValueError(f"vectors must have shape {expected} (n, T, d), got {tuple(vectors.shape)}")
        vectors = vectors.cpu().to(self._dtype)
        self._check_finite(vectors, "")
        return vectors

    @staticmethod
    def _check_finite(vectors: torch.Tensor, where: str) -> None:
        finite = torch.isfinite(vectors).flatten(1).all(dim=1)
        if not bool(finite.all()):
            r = int((~finite).nonzero()[0])
            raise ValueError(f"{where}vectors at row {r} contain NaN or inf (after casting to the storage dtype)")

    def _check_loaded_rows(self, rows: torch.Tensor, path: str) -> torch.Tensor:
        if rows.dtype not in _DENSE_DTYPES:
            raise ValueError(f"{path}: vectors have dtype {rows.dtype}, expected one of {_DENSE_DTYPES}")
        self._dtype = rows.dtype
        self._check_finite(rows, f"{path}: ")
        return rows

    def _payload_header(self) -> dict[str, str]:
        return {"hidden_size": str(self._hidden_size)}

    @classmethod
    def _from_header(cls, header: dict[str, str], path: str) -> "DenseMemoryBank":
        return cls(_int_field(header, "num_tokens", path), _int_field(header, "hidden_size", path))

    def __repr__(self) -> str:
        n = len(self)
        per_doc = self.nbytes / n if n else 0.0
        return (
            f"DenseMemoryBank(N={n}, T={self._num_tokens}, d={self._hidden_size}, "
            f"dtype={str(self._dtype).replace('torch.', '')}, bytes/doc={per_doc:.1f})"
        )


def load_bank(path: str | os.PathLike) -> CompressedMemoryBank | DenseMemoryBank:
    """Load whichever bank a file holds (by its ``format`` tag), read once; errors as in `_DocRowBank.load`."""
    return _DocRowBank.load(path)

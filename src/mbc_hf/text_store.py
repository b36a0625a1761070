"""Hybrid reading's text store (MAC's best row is BM25 + memory; off by default: the bank alone is the point).

A `TextStore` keeps the full text of documents beside a bank, in an SQLite database file (one table ``documents``:
``doc_id TEXT PRIMARY KEY, text TEXT``; writes are transactions, so an interrupted write leaves the file as it was),
and ranks it with BM25 (``bm25s``, Lucene's variant, English stop words removed) for
``model.answer(questions, memory_bank=bank, text_store=store)``, which puts the top-1 passage in the prompt on top of
the bank's prefix key/values.
"""

import os
import sqlite3

import bm25s


class TextStore:
    """Document texts by doc id in an SQLite file (``":memory:"`` for none), with BM25 search over them.

    Args:
        path: the database file; created when missing.

    Raises:
        sqlite3.DatabaseError: ``path`` is not an SQLite database written by `TextStore`.
    """

    def __init__(self, path: str | os.PathLike = ":memory:"):
        self.path = str(path)
        self._db = sqlite3.connect(self.path)
        self._db.execute("CREATE TABLE IF NOT EXISTS documents (doc_id TEXT PRIMARY KEY, text TEXT NOT NULL)")
        self._db.commit()
        self._bm25 = self._ids = None

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    def __contains__(self, doc_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM documents WHERE doc_id = ?", (doc_id,)).fetchone() is not None

    def add(self, doc_ids: list[str], texts: list[str]) -> None:
        """Store (or replace) texts under their doc ids, in one transaction.

        Raises:
            ValueError: lengths differ, or a text / id is not a str.
        """
        if len(doc_ids) != len(texts) or not all(isinstance(x, str) for x in [*doc_ids, *texts]):
            raise ValueError(f"TextStore.add needs one str text per str doc id; got {len(doc_ids)} ids and "
                             f"{len(texts)} texts.")
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO documents VALUES (?, ?)", zip(doc_ids, texts))
        self._bm25 = None

    def get(self, doc_id: str) -> str:
        """The text stored under ``doc_id``. Raises ``KeyError`` when there is none."""
        row = self._db.execute("SELECT text FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
        if row is None:
            raise KeyError(f"no document {doc_id!r} in the text store {self.path}")
        return row[0]

    def _index(self):
        if self._bm25 is None:
            rows = self._db.execute("SELECT doc_id, text FROM documents ORDER BY rowid").fetchall()
            self._ids = [r[0] for r in rows]
            self._bm25 = bm25s.BM25()
            if rows:
                self._bm25.index(bm25s.tokenize([r[1] for r in rows], stopwords="en", show_progress=False),
                                 show_progress=False)
        return self._bm25

    def search(self, queries: list[str], k: int = 1) -> list[tuple[list[str], list[float]]]:
        """BM25 top-``k`` of each query: a list of (doc ids, scores), best first (empty for an empty store)."""
        bm25 = self._index()
        if not self._ids:
            return [([], []) for _ in queries]
        k = min(k, len(self._ids))
        docs, scores = bm25.retrieve(bm25s.tokenize(list(queries), stopwords="en", return_ids=False,
                                                    show_progress=False), k=k,
                                     show_progress=False)
        return [([self._ids[i] for i in d], [float(x) for x in s]) for d, s in zip(docs.tolist(), scores.tolist())]

    def close(self) -> None:
        self._db.close()

"""Hybrid reading's text store (MAC's best row is BM25 + memory; off by default: the bank alone is the point).

A `TextStore` keeps the full text of documents beside a bank, in an SQLite database file (one table ``documents``:
``doc_id TEXT PRIMARY KEY, text TEXT``; writes are transactions, so an interrupted write leaves the file as it was;
the file is marked with `APPLICATION_ID`, so a database of another program is refused rather than written into),
and ranks it with BM25 (``bm25s``, Lucene's variant, English stop words removed) for
``model.answer(questions, memory_bank=bank, text_store=store)``, which puts the top-1 passage in the prompt on top of
the bank's prefix key/values (only a passage that shares a word with the question: a score above 0).
"""

import os
import sqlite3

import bm25s

#: ``PRAGMA application_id`` of a TextStore database ("MBCT"). Files written before it was set (application id 0)
#: are accepted when their only table is TextStore's ``documents``.
APPLICATION_ID = 0x4D424354
_COLUMNS = [("doc_id", "TEXT", 0, 1), ("text", "TEXT", 1, 0)]  # (name, type, not null, primary key)


class TextStore:
    """Document texts by doc id in an SQLite file (``":memory:"`` for none), with BM25 search over them.

    Args:
        path: the database file; created when missing (its folder must exist).

    Raises:
        FileNotFoundError: the folder of ``path`` does not exist.
        ValueError: ``path`` is a folder, not an SQLite database, or a database of another program (one that
            TextStore did not create); the message names the path.
    """

    def __init__(self, path: str | os.PathLike = ":memory:"):
        self.path = str(path)
        self._bm25 = self._ids = None
        if self.path != ":memory:":
            folder = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"text store {self.path}: its folder {folder} does not exist; create the "
                                        "folder first (TextStore creates the database file, not its folder).")
            if os.path.isdir(self.path):
                raise ValueError(f"text store {self.path} is a folder; pass the path of a database file in it, "
                                 f"e.g. {os.path.join(self.path, 'texts.sqlite')}.")
        try:
            self._db = sqlite3.connect(self.path)
        except sqlite3.Error as exc:
            raise ValueError(f"text store {self.path}: cannot open it ({exc}); check the path and its "
                             "permissions.") from None
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        try:
            app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
            tables = [r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            if not tables and app_id == 0:  # a new (empty) file: make it a TextStore
                with self._db:
                    self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    self._db.execute("CREATE TABLE documents (doc_id TEXT PRIMARY KEY, text TEXT NOT NULL)")
                return
            columns = [(r[1], r[2].upper(), r[3], r[5]) for r in self._db.execute("PRAGMA table_info(documents)")]
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{self.path} is not a TextStore database (sqlite: {exc}); pass the file a TextStore "
                             "wrote, or the path of a new file.") from None
        ours = app_id == APPLICATION_ID or (app_id == 0 and tables == ["documents"])  # 0: written before the mark
        if not ours or columns != _COLUMNS:
            raise ValueError(f"{self.path} is an SQLite database of another program (tables {tables}, application id "
                             f"{app_id}), not a TextStore: it is left untouched; pass the path of a new file for the "
                             "text store.")

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    def __contains__(self, doc_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM documents WHERE doc_id = ?", (doc_id,)).fetchone() is not None

    def add(self, doc_ids: list[str], texts: list[str]) -> None:
        """Store (or replace) texts under their doc ids, in one transaction.

        Raises:
            TypeError: ``doc_ids`` or ``texts`` is a single str (wrap one document as ``add([doc_id], [text])``).
            ValueError: lengths differ, or a text / id is not a str.
        """
        if isinstance(doc_ids, str) or isinstance(texts, str):
            raise TypeError("TextStore.add takes a list of doc ids and a list of texts, got a single str; wrap one "
                            "document as add([doc_id], [text]).")
        doc_ids, texts = list(doc_ids), list(texts)
        if len(doc_ids) != len(texts) or not all(isinstance(x, str) for x in [*doc_ids, *texts]):
            raise ValueError(f"TextStore.add needs one str text per str doc id; got {len(doc_ids)} ids and "
                             f"{len(texts)} texts.")
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO documents VALUES (?, ?)", zip(doc_ids, texts))
        self._bm25 = self._ids = None

    def get(self, doc_id: str) -> str:
        """The text stored under ``doc_id``. Raises ``KeyError`` when there is none."""
        row = self._db.execute("SELECT text FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
        if row is None:
            raise KeyError(f"no document {doc_id!r} in the text store {self.path}")
        return row[0]

    def _index(self):
        """The BM25 index of the stored texts, or None when they hold no word to search (an empty store, or only
        stop words and one-letter words); set only once complete, so a failed build is retried by the next call."""
        if self._ids is None:
            rows = self._db.execute("SELECT doc_id, text FROM documents ORDER BY rowid").fetchall()
            bm25 = None
            corpus = bm25s.tokenize([r[1] for r in rows], stopwords="en", show_progress=False) if rows else None
            if corpus is not None and len(corpus.vocab) > 0:
                bm25 = bm25s.BM25()
                bm25.index(corpus, show_progress=False)
            self._bm25, self._ids = bm25, [r[0] for r in rows]
        return self._bm25

    def search(self, queries: list[str], k: int = 1) -> list[tuple[list[str], list[float]]]:
        """BM25 top-``k`` of each query: a list of (doc ids, scores), best first (empty when the store is empty or
        holds no searchable word). A hit of score 0 shares no word with its query."""
        bm25 = self._index()
        if bm25 is None:
            return [([], []) for _ in queries]
        k = min(k, len(self._ids))
        docs, scores = bm25.retrieve(bm25s.tokenize(list(queries), stopwords="en", return_ids=False,
                                                    show_progress=False), k=k,
                                     show_progress=False)
        return [([self._ids[i] for i in d], [float(x) for x in s]) for d, s in zip(docs.tolist(), scores.tolist())]

    def top_passages(self, queries: list[str]) -> list[str | None]:
        """The passage hybrid reading puts before each query (at test time, `MBCModelForCausalLM.answer` with
        ``text_store``; in training, ``hybrid_passages``): the doc id of its BM25 top-1 hit, or None when there is
        none or it shares no word with the query (score 0)."""
        return [ids[0] if ids and scores[0] > 0 else None for ids, scores in self.search(queries, k=1)]

    def close(self) -> None:
        self._db.close()

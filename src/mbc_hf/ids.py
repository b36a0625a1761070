"""Document ids and the one text check they need, without torch or transformers: `mbc_hf.data` reads (and rejects)
data files with them before any model is loaded, and the model names the documents it memorizes with them."""

import hashlib


def document_id(text: str) -> str:
    """Stable id of a document: the first 16 hex chars of SHA-1 of its UTF-8 text."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def lone_surrogate_at(text: str) -> int | None:
    """Index of the first lone surrogate (U+D800-U+DFFF without its pair, e.g. from a broken JSON escape) in
    ``text``, or None. Such a str cannot be encoded as UTF-8: it can be neither hashed into a doc_id nor saved."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


__all__ = ["document_id", "lone_surrogate_at"]

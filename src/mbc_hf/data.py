"""Offline loaders for document-QA data (SQuAD, ArchivalQA, StreamingQA layouts).

MBC / MAC evaluation streams documents into a memory bank and then answers questions.
The loaders here turn the usual file layouts into one `datasets.Dataset` with ONE ROW PER
QUESTION and the columns

====================  ==========  ==========================================================
column                type        meaning
====================  ==========  ==========================================================
``doc_id``            str         stable document id: the source's paragraph id if it has
                                  one, else ``document_id(context)`` = first 16 hex chars
                                  of SHA-1 of the UTF-8 text. Rows with the same context
                                  text always share the doc_id of its first appearance.
``context``           str         the document text, unchanged
``question``          str         the question text, unchanged (not stripped)
``answers``           list[str]   all reference answers, in the source order
``question_id``       str         the source's question id, else ``"<doc_id>:<k>"`` (k-th
                                  question of that document in file order, from 0)
====================  ==========  ==========================================================

Nothing is downloaded: files are parsed with the standard library and the result is
built with `datasets.Dataset.from_dict`. See `load_qa_file`, `documents` and
`load_documents_file`.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from .ids import document_id, lone_surrogate_at


__all__ = [
    "ANSWER_COLUMNS",
    "DOCUMENT_COLUMNS",
    "EmptyDocumentWarning",
    "FEATURES",
    "FORMATS",
    "documents",
    "document_id",
    "load_documents_file",
    "load_qa_file",
]

#: Values accepted by ``load_qa_file(..., format=...)``.
FORMATS = ("squad", "paragraphs", "archivalqa_subset", "flat")
#: Document-text columns of the flat layout, in order of preference.
DOCUMENT_COLUMNS = ("context", "text", "ans_paragraph")
#: Answer columns of the flat layout, in order of preference.
ANSWER_COLUMNS = ("answers", "answer")
_QUESTION_ID_KEYS = ("question_id", "id", "qid")
_PARAGRAPH_ID_KEYS = ("paragraph_id", "para_id")
_DOC_TEXT_KEYS = ("text", "context")  # plain documents JSONL/CSV
_DOC_ID_KEYS = ("id", "doc_id")
#: StreamingQA CSVs of the reference code separate several answers with one backslash.
ANSWER_SEPARATOR = "\\"

#: Features of every Dataset returned by `load_qa_file`.
FEATURES = datasets.Features(
    {
        "doc_id": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")),
        "question_id": datasets.Value("string"),
    }
)


class EmptyDocumentWarning(UserWarning):
    """Emitted when empty or whitespace-only documents (and their questions) are skipped."""


# --------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    """Read a (optionally gzipped) UTF-8 file; a leading BOM is dropped.

    Raises ValueError naming the byte offset and line of the first undecodable byte.
    """
    gz = path.suffix.lower() == ".gz"
    try:
        if gz:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read file: {e}") from e
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = raw.count(b"\n", 0, offset) + 1
        what = "decompressed byte offset" if gz else "byte offset"
        raise ValueError(
            f"{path}: line {line}: invalid UTF-8 at {what} {offset} "
            f"(byte {raw[offset:offset + 1]!r}: {e.reason}); the file must be UTF-8 encoded"
        ) from None


def _base_suffix(path: Path) -> str:
    """Extension without a trailing .gz, lower-cased (``data.jsonl.gz`` -> ``.jsonl``)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


@dataclass
class _Source:
    """A parsed file: either a SQuAD JSON object or a list of flat records."""

    path: Path
    squad: dict | None = None
    records: list[tuple[str, dict]] | None = None  # (location, record)
    columns: list[str] | None = None  # CSV header
    header_where: str | None = None


def _parse_jsonl(path: Path, text: str) -> _Source:
    records = []
    # split on "\n" only: str.splitlines() would also split inside JSON strings at U+2028 etc.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise _too_deep(path, f"line {lineno}") from None
        if not isinstance(obj, dict):
            raise ValueError(
                f"{path}: line {lineno}: expected a JSON object per line, got {type(obj).__name__}"
            )
        records.append((f"line {lineno}", obj))
    if not records:
        raise ValueError(f"{path}: file is empty (no JSON lines)")
    return _Source(path, records=records)


def _too_deep(path: Path, where: str) -> ValueError:
    return ValueError(f"{path}: {where}: JSON nested too deeply to read (more levels of arrays/objects than Python's "
                      f"recursion limit, {sys.getrecursionlimit()}); a record is a flat object of strings: fix or drop "
                      "that line")


def _line_too_deep(text: str) -> int:
    """Line (from 1) where the arrays/objects of a JSON text first nest deeper than the recursion limit allows."""
    limit, depth, line, in_string, escaped = sys.getrecursionlimit() // 2, 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        elif in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return line
        elif ch in "]}":
            depth -= 1
    return line


def _parse_json(path: Path, text: str) -> _Source:
    """A single JSON document (SQuAD object or array of records); falls back to JSON lines."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise _too_deep(path, f"line {_line_too_deep(text)}") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: JSON lines (e.g. Dataset.to_json output)
            return _parse_jsonl(path, text)
        if not text.strip():
            raise ValueError(f"{path}: file is empty") from None
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(obj, dict):
        if len(text.strip().split("\n")) > 1 or "data" in obj:
            return _Source(path, squad=obj)
        return _Source(path, records=[("line 1", obj)])  # a one-line JSONL file
    if isinstance(obj, list):
        records = []
        for i, rec in enumerate(obj):
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: record {i}: expected a JSON object, got {type(rec).__name__}")
            records.append((f"record {i}", rec))
        if not records:
            raise ValueError(f"{path}: file holds an empty JSON array")
        return _Source(path, records=records)
    raise ValueError(f"{path}: expected a JSON object or array at top level, got {type(obj).__name__}")


def _parse_csv(path: Path, text: str, delimiter: str) -> _Source:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents exceed the 128 KiB default
    try:
        # strict: an unterminated quote is an error, not a field that swallows the rest of the file
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        header: list[str] | None = None
        records = []
        prev_line = 0
        try:
            for row in reader:
                start_line = prev_line + 1
                prev_line = reader.line_num
                if not row:
                    continue
                if header is None:
                    header = [h.strip() for h in row]
                    continue
                if len(row) > len(header):
                    raise ValueError(
                        f"{path}: line {start_line}: {len(row)} fields but the header has {len(header)}"
                    )
                rec = dict(zip(header, row))
                for col in header[len(row):]:
                    rec[col] = None  # a short row: mark missing cells
                records.append((f"line {start_line}", rec))
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise ValueError(f"{path}: line {prev_line + 1}: malformed CSV: a quoted field that starts on this "
                                 "line is never closed (unterminated quote); close it or escape the quote as \"\"")\
                    from None
            raise ValueError(f"{path}: line {reader.line_num}: malformed CSV: {e}") from None
    finally:
        csv.field_size_limit(old_limit)
    if header is None:
        raise ValueError(f"{path}: file is empty (no CSV header)")
    return _Source(path, records=records, columns=header, header_where="line 1 (header)")


def _read_source(path: Path, container: str | None = None) -> _Source:
    """Parse ``path``; `container` is "json" / "jsonl" / "csv" / "tsv" or None (auto)."""
    text = _read_text(path)
    if container is None:
        suffix = _base_suffix(path)
        container = {
            ".json": "json",
            ".jsonl": "jsonl",
            ".ndjson": "jsonl",
            ".jsonlines": "jsonl",
            ".csv": "csv",
            ".tsv": "tsv",
        }.get(suffix)
        if container is None:  # unknown extension: sniff the first character
            first = text.lstrip()[:1]
            container = "json" if first in ("{", "[") else "csv"
    if container == "json":
        return _parse_json(path, text)
    if container == "jsonl":
        return _parse_jsonl(path, text)
    return _parse_csv(path, text, "\t" if container == "tsv" else ",")


# --------------------------------------------------------------------------- validation


def _err(path: Path, where: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {where}: {msg}")


def _valid_unicode(path: Path, where: str, key: str, value: str) -> str:
    """`value`, or a ValueError if it holds a lone surrogate (a JSON ``\\ud800``-``\\udfff`` escape without its
    pair): such a str cannot be encoded as UTF-8, so it could be neither hashed into a doc_id nor saved."""
    if (at := lone_surrogate_at(value)) is not None:
        raise _err(path, where, f"field {key!r} holds a lone surrogate {value[at]!r} at character {at} (an unpaired "
                   "\\uD800-\\uDFFF JSON escape), which is not valid Unicode; fix or drop that escape in the file")
    return value


def _get_str(path: Path, where: str, rec: dict, key: str, *, allow_empty: bool = True) -> str:
    value = rec.get(key)
    if value is None:
        raise _err(path, where, f"missing value for {key!r}")
    if not isinstance(value, str):
        raise _err(path, where, f"field {key!r} must be a string, got {type(value).__name__}: {value!r:.80}")
    if not allow_empty and not value.strip():
        raise _err(path, where, f"empty {key!r}")
    return _valid_unicode(path, where, key, value)


def _get_id(path: Path, where: str, rec: dict, keys: tuple[str, ...]) -> str | None:
    """First present id among `keys` as str (ints allowed); empty / missing -> None."""
    for key in keys:
        value = rec.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _err(path, where, f"field {key!r} must be a string or integer, got {type(value).__name__}")
        return _valid_unicode(path, where, key, str(value))
    return None


def _answers(path: Path, where: str, key: str, value: Any, *, split: bool) -> list[str]:
    """Normalize an answers field to a non-empty list of non-empty strings.

    Accepted: a string (split on backslash when `split`; empty pieces are dropped), a list
    of strings, a list of ``{"text": str}`` objects (official SQuAD) or a
    ``{"text": [str, ...]}`` object (HF ``squad``).
    """
    if value is None:
        raise _err(path, where, f"missing value for {key!r}")
    if isinstance(value, str):
        items = value.split(ANSWER_SEPARATOR) if split else [value]
        out = [_valid_unicode(path, where, key, a) for a in items if a.strip()]
        if not out:
            raise _err(path, where, f"empty {key!r} (no reference answer)")
        return out
    if isinstance(value, dict):
        if "text" not in value:
            raise _err(path, where, f"{key!r} object has no 'text' list (keys: {sorted(value)})")
        value = value["text"]
        if isinstance(value, str):
            value = [value]
    if not isinstance(value, list):
        raise _err(path, where, f"field {key!r} must be a string or a list, got {type(value).__name__}")
    out = []
    for j, a in enumerate(value):
        if isinstance(a, dict):
            a = a.get("text")
        if not isinstance(a, str):
            raise _err(path, where, f"{key}[{j}] must be a string, got {type(a).__name__}: {a!r:.80}")
        if not a.strip():
            raise _err(path, where, f"{key}[{j}] is an empty answer")
        out.append(_valid_unicode(path, where, f"{key}[{j}]", a))
    if not out:
        raise _err(path, where, f"no reference answers in {key!r}")
    return out


def _missing_columns_error(path, where, found, missing, accepted) -> ValueError:
    missing = [m if m.startswith(("'", "one of")) else repr(m) for m in missing]
    return _err(
        path,
        where,
        f"missing required column(s) {', '.join(missing)}; columns found: {sorted(found)}; "
        f"accepted: {accepted}",
    )


# --------------------------------------------------------------------------- layouts


@dataclass
class _Row:
    src_doc_id: str | None
    context: str
    question: str
    answers: list[str]
    question_id: str | None
    where: str


def _rows_squad(src: _Source) -> list[_Row]:
    path, obj = src.path, src.squad
    data = obj.get("data")
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: not the SQuAD JSON layout: expected a top-level 'data' list, "
            f"found keys {sorted(obj)}"
        )
    rows = []
    for a, article in enumerate(data):
        aw = f"data[{a}]"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise _err(path, aw, "article must be an object with a 'paragraphs' list")
        title = article.get("title")
        if title is not None and not isinstance(title, str):
            raise _err(path, aw, f"'title' must be a string, got {type(title).__name__}")
        if title is not None:
            _valid_unicode(path, aw, "title", title)
        for p, para in enumerate(article["paragraphs"]):
            pw = f"{aw}.paragraphs[{p}]"
            if not isinstance(para, dict):
                raise _err(path, pw, "paragraph must be an object")
            if "context" not in para or "qas" not in para:
                raise _missing_columns_error(
                    path, pw, para, [k for k in ("context", "qas") if k not in para], "context, qas"
                )
            context = _get_str(path, pw, para, "context")
            if not isinstance(para["qas"], list):
                raise _err(path, pw, "'qas' must be a list")
            src_doc_id = f"{title}#{p}" if title else None
            for q, qa in enumerate(para["qas"]):
                qw = f"{pw}.qas[{q}]"
                if not isinstance(qa, dict):
                    raise _err(path, qw, "question must be an object")
                qid = _get_id(path, qw, qa, ("id",))
                if qid is not None:
                    qw += f" (id {qid!r})"
                for key in ("question", "answers"):
                    if key not in qa:
                        raise _missing_columns_error(path, qw, qa, [key], "id, question, answers")
                rows.append(
                    _Row(
                        src_doc_id,
                        context,
                        _get_str(path, qw, qa, "question", allow_empty=False),
                        _answers(path, qw, "answers", qa["answers"], split=False),
                        qid,
                        qw,
                    )
                )
    return rows


def _rows_paragraphs(src: _Source) -> list[_Row]:
    path = src.path
    rows = []
    for where, rec in src.records:
        missing = [k for k in ("context", "qas") if k not in rec]
        if missing:
            raise _missing_columns_error(
                path, where, rec, missing, "paragraph_id (optional), title, context, qas"
            )
        context = _get_str(path, where, rec, "context")
        src_doc_id = _get_id(path, where, rec, _PARAGRAPH_ID_KEYS)
        if not isinstance(rec["qas"], list):
            raise _err(path, where, "'qas' must be a list")
        for q, qa in enumerate(rec["qas"]):
            qw = f"{where}: qas[{q}]"
            if not isinstance(qa, dict):
                raise _err(path, qw, "question must be an object")
            qid = _get_id(path, qw, qa, ("id",))
            if qid is not None:
                qw += f" (id {qid!r})"
            for key in ("question", "answers"):
                if key not in qa:
                    raise _missing_columns_error(path, qw, qa, [key], "id, question, answers")
            rows.append(
                _Row(
                    src_doc_id,
                    context,
                    _get_str(path, qw, qa, "question", allow_empty=False),
                    _answers(path, qw, "answers", qa["answers"], split=False),
                    qid,
                    qw,
                )
            )
    return rows


def _rows_archivalqa_subset(src: _Source, filter_label: str | None) -> list[_Row]:
    path = src.path
    required = ["question", "answer", "para_text"] + (["label"] if filter_label is not None else [])
    rows = []
    for where, rec in src.records:
        missing = [k for k in required if k not in rec]
        if missing:
            raise _missing_columns_error(
                path, where, rec, missing, "id, question, answer, para_id, para_text, label"
            )
        question = _get_str(path, where, rec, "question", allow_empty=False)
        answers = _answers(path, where, "answer", rec["answer"], split=False)
        context = _get_str(path, where, rec, "para_text")
        qid = _get_id(path, where, rec, ("id",))
        src_doc_id = _get_id(path, where, rec, ("para_id",))
        if filter_label is not None and _get_str(path, where, rec, "label") != filter_label:
            continue
        rows.append(_Row(src_doc_id, context, question, answers, qid, where))
    return rows


def _flat_columns(path: Path, where: str, found) -> tuple[str, str, str]:
    doc_col = next((c for c in DOCUMENT_COLUMNS if c in found), None)
    ans_col = next((c for c in ANSWER_COLUMNS if c in found), None)
    missing = []
    if "question" not in found:
        missing.append("'question'")
    if ans_col is None:
        missing.append("'answers' or 'answer'")
    if doc_col is None:
        missing.append("one of " + "/".join(repr(c) for c in DOCUMENT_COLUMNS))
    if missing:
        raise _missing_columns_error(
            path,
            where,
            found,
            missing,
            "'question'; 'answers' (list, or string with answers separated by '\\') or 'answer'; "
            "document text in 'context', 'text' or 'ans_paragraph'; optional ids "
            "'question_id'/'id'/'qid' and 'paragraph_id'/'para_id'/'doc_id'(+'para_num')",
        )
    return doc_col, ans_col, "question"


def _flat_doc_id(path: Path, where: str, rec: dict) -> str | None:
    pid = _get_id(path, where, rec, _PARAGRAPH_ID_KEYS)
    if pid is not None:
        return pid
    doc = _get_id(path, where, rec, ("doc_id",))
    if doc is not None:
        para = _get_id(path, where, rec, ("para_num",))
        return doc if para is None else f"{doc}_{para}"
    return None


def _rows_flat(src: _Source) -> list[_Row]:
    path = src.path
    fixed = None
    if src.columns is not None:
        fixed = _flat_columns(path, src.header_where, src.columns)
    rows = []
    for where, rec in src.records:
        doc_col, ans_col, q_col = fixed or _flat_columns(path, where, rec)
        question = _get_str(path, where, rec, q_col, allow_empty=False)
        answers = _answers(path, where, ans_col, rec.get(ans_col), split=ans_col == "answers")
        context = _get_str(path, where, rec, doc_col)
        rows.append(
            _Row(
                _flat_doc_id(path, where, rec),
                context,
                question,
                answers,
                _get_id(path, where, rec, _QUESTION_ID_KEYS),
                where,
            )
        )
    return rows


def _record_layout(rec: dict) -> str:
    if "qas" in rec and "context" in rec:
        return "paragraphs"
    if "para_text" in rec and "question" in rec:
        return "archivalqa_subset"
    return "flat"


# --------------------------------------------------------------------------- assembling


def _check_downsample(downsample_to) -> None:
    if downsample_to is None:
        return
    if isinstance(downsample_to, bool) or not isinstance(downsample_to, int) or downsample_to < 1:
        raise ValueError(f"downsample_to must be a positive int or None, got {downsample_to!r}")


def _drop_empty_documents(path: Path, rows: list[_Row], what: str = "question(s)") -> list[_Row]:
    kept = [r for r in rows if r.context.strip()]
    n_skipped = len(rows) - len(kept)
    if n_skipped:
        n_docs = len({(r.src_doc_id, r.context) for r in rows if not r.context.strip()})
        warnings.warn(
            f"{path}: skipped {n_skipped} {what} on {n_docs} empty or whitespace-only document(s)",
            EmptyDocumentWarning,
            stacklevel=4,  # the caller of load_qa_file / load_documents_file
        )
    return kept


def _canonical_doc_ids(path: Path, rows: list[_Row]) -> list[str]:
    """doc_id per row: first appearance of its text decides; an id used for two texts is an error."""
    by_text: dict[str, str] = {}
    text_of_id: dict[str, tuple[str, str]] = {}  # src id -> (text, where)
    out = []
    for r in rows:
        if r.src_doc_id is not None:
            seen = text_of_id.setdefault(r.src_doc_id, (r.context, r.where))
            if seen[0] != r.context:
                raise _err(
                    path,
                    r.where,
                    f"document id {r.src_doc_id!r} was already used for a different text at {seen[1]}",
                )
        doc_id = by_text.get(r.context)
        if doc_id is None:
            doc_id = r.src_doc_id if r.src_doc_id is not None else document_id(r.context)
            by_text[r.context] = doc_id
        out.append(doc_id)
    return out


def _first_k_documents(contexts: list[str], k: int | None) -> list[int]:
    """Indices of the rows whose document is among the first `k` unique texts (file order)."""
    if k is None:
        return list(range(len(contexts)))
    keep: set[str] = set()
    out = []
    for i, c in enumerate(contexts):
        if c not in keep:
            if len(keep) >= k:
                continue
            keep.add(c)
        out.append(i)
    return out


def _to_dataset(path: Path, rows: list[_Row], downsample_to: int | None) -> datasets.Dataset:
    rows = _drop_empty_documents(path, rows)
    doc_ids = _canonical_doc_ids(path, rows)
    per_doc: dict[str, int] = {}
    qids = []
    for r, d in zip(rows, doc_ids):
        k = per_doc.get(d, 0)
        per_doc[d] = k + 1
        qids.append(r.question_id if r.question_id is not None else f"{d}:{k}")
    idx = _first_k_documents([r.context for r in rows], downsample_to)
    qid_list = [qids[i] for i in idx]
    if len(set(qid_list)) != len(qid_list):
        seen, dup = set(), None
        for q in qid_list:
            if q in seen:
                dup = q
                break
            seen.add(q)
        warnings.warn(f"{path}: question ids are not unique (e.g. {dup!r})", UserWarning, stacklevel=3)
    return datasets.Dataset.from_dict(
        {
            "doc_id": [doc_ids[i] for i in idx],
            "context": [rows[i].context for i in idx],
            "question": [rows[i].question for i in idx],
            "answers": [rows[i].answers for i in idx],
            "question_id": qid_list,
        },
        features=FEATURES,
    )


def _qa_rows(src: _Source, format: str | None, filter_label: str | None) -> list[_Row]:
    if src.squad is not None:
        if format not in (None, "squad"):
            raise ValueError(f"{src.path}: holds a single JSON object (SQuAD layout), not format {format!r}")
        return _rows_squad(src)
    if format == "squad":
        raise ValueError(f"{src.path}: format 'squad' needs one JSON object with a 'data' list")
    if format is not None:
        layout = format
    elif src.records:
        layout = _record_layout(src.records[0][1])
    else:  # a CSV with a header only
        layout = "flat"
    if layout == "paragraphs":
        return _rows_paragraphs(src)
    if layout == "archivalqa_subset":
        return _rows_archivalqa_subset(src, filter_label)
    return _rows_flat(src)


# --------------------------------------------------------------------------- public API


def load_qa_file(
    path: str | os.PathLike,
    *,
    downsample_to: int | None = None,
    format: str | None = None,
    filter_label: str | None = "Y",
) -> datasets.Dataset:
    """Load a question-answering file as a `datasets.Dataset`, one row per question.

    Accepted layouts (UTF-8; a ``.gz`` suffix is decompressed transparently). ``format``
    is one of `FORMATS`; by default it is detected from the extension and content:

    * ``"squad"`` -- official SQuAD JSON (``.json``)
      ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
      "answers": [{"text", "answer_start"}]}]}]}]}``. doc_id is ``"<title>#<paragraph
      index>"`` (the convention of the paragraph JSONL files), or SHA-1 without a title.
    * ``"paragraphs"`` -- one JSON object per paragraph (``.jsonl``), as in
      ``shared/data/squad/*.paragraphs.jsonl``: ``paragraph_id, title, context, qas:
      [{id, question, answers: {text: [...], answer_start: [...]}}]``; doc_id is
      ``paragraph_id``. Detected by the keys ``context`` and ``qas``.
    * ``"archivalqa_subset"`` -- one question per line (``.jsonl``), as in
      ``shared/data/archivalqa_subset/*.jsonl``: ``id, question, answer, label, split,
      para_id, nyt_doc_id, para_index, answer_start, para_text``; doc_id is ``para_id``,
      context is ``para_text``. Only rows whose ``label`` equals ``filter_label`` (default
      ``"Y"``, the human-approved triples) are kept; pass ``filter_label=None`` to keep
      all rows. Rows stay in file order (sort by ``nyt_doc_id, para_index`` yourself for a
      chronological stream). Detected by the keys ``question`` and ``para_text``.
      ``filter_label`` is ignored for the other layouts.
    * ``"flat"`` -- any other JSON lines / JSON array of objects / CSV (``.csv``) / TSV
      (``.tsv``) with one question per row: ``question``; ``answers`` (a list of strings,
      an HF-style ``{"text": [...]}`` object, or a string holding several answers
      separated by a backslash ``\\`` as in the StreamingQA CSVs of the reference code;
      empty pieces are dropped) or ``answer`` (one answer, never split); the document
      text in ``context``, ``text`` (StreamingQA CSV: ``text, question, answers``) or
      ``ans_paragraph`` (ArchivalQA CSV: ``question, answer, ans_paragraph, ans_text,
      doc_id, para_num``), first match in that order. doc_id comes from ``paragraph_id``
      / ``para_id``, else ``"<doc_id>_<para_num>"`` / ``doc_id``, else SHA-1. The question
      id comes from ``question_id`` / ``id`` / ``qid``. Other columns are ignored.

    Returned columns (`FEATURES`): ``doc_id`` (str), ``context`` (str), ``question`` (str),
    ``answers`` (list[str], all references in source order), ``question_id`` (str). Rows
    keep the file order. Rows with identical context text share the doc_id of the first
    appearance of that text. Without a source question id, ``question_id`` is
    ``"<doc_id>:<k>"`` (k-th question of that document, from 0). Text is not stripped.

    Args:
        path: the file.
        downsample_to: keep only the rows of the first N unique documents (by text) in
            file order, like ``return_k_unique`` of the MBC reference code (no shuffle).
            ``None`` keeps everything.
        format: force a layout (one of `FORMATS`) instead of detecting it.
        filter_label: label to keep for the ArchivalQA-subset layout (``None``: all).

    Empty or whitespace-only documents are skipped together with their questions; an
    `EmptyDocumentWarning` (a UserWarning) reports how many questions and documents were
    dropped. Duplicate question ids give a UserWarning.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown ``format`` or a bad ``downsample_to``; and malformed input, with
            the file name and the location (``line N`` for JSONL/CSV, ``record N`` for a
            JSON array, ``data[a].paragraphs[p].qas[q] (id '...')`` for SQuAD JSON): bytes
            that are not UTF-8 (line and byte offset), invalid JSON, missing required
            columns/keys (the message lists the columns found and those accepted), an empty
            question, non-string fields, answers that are empty, a string holding a lone-surrogate
            JSON escape (``\\ud800``; not valid Unicode), a document id used for two different texts,
            an empty file.
    """
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS} or None")
    _check_downsample(downsample_to)
    container = "json" if format == "squad" else None
    src = _read_source(path, container)
    rows = _qa_rows(src, format, filter_label)
    return _to_dataset(path, rows, downsample_to)


def load_qa_files(paths, *, downsample_to: int | None = None) -> datasets.Dataset:
    """Several QA files (any layouts of `load_qa_file`) as one dataset, in the order given: e.g. SQuAD train
    paragraphs plus the ArchivalQA subset, for meta-training on more topics.

    A document found in two files under different ids keeps the first id (documents are deduplicated by text, as
    within one file).

    Args:
        paths: the files (one path alone is accepted too).
        downsample_to: keep only the rows of the first N unique documents of the concatenation.

    Raises:
        ValueError: no files, a bad ``downsample_to``, or one doc_id naming different texts in two files (rename
            the ids in one of them); and every error of `load_qa_file`.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("load_qa_files: no files given")
    _check_downsample(downsample_to)
    parts, owner, id_of = [], {}, {}  # doc_id -> (file, text); text -> first doc_id
    for path in paths:
        ds = load_qa_file(path)
        docs = documents(ds)
        for doc_id, text in docs:
            first = owner.setdefault(doc_id, (path, text))
            if first[1] != text:
                raise ValueError(f"doc_id {doc_id!r} names different documents in {first[0]} and {path}; "
                                 "rename the ids in one of the files so that every document keeps its own id")
            id_of.setdefault(text, doc_id)
        if any(id_of[text] != doc_id for doc_id, text in docs):  # a text seen before under another id
            ds = ds.map(lambda row: {"doc_id": id_of[row["context"]]})
        parts.append(ds)
    merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if downsample_to is not None:
        merged = merged.select(_first_k_documents(merged["context"], downsample_to))
    return merged


def documents(ds) -> list[tuple[str, str]]:
    """Unique documents of a QA dataset: ``[(doc_id, context), ...]`` in first-appearance order.

    ``ds`` is a Dataset from `load_qa_file` (anything indexable by the column names
    ``"doc_id"`` and ``"context"`` works, e.g. a dict of lists). Documents are deduplicated
    by their text; the doc_id of the first row with that text is returned.
    Raises KeyError if a column is missing.
    """
    out = []
    seen: set[str] = set()
    for doc_id, context in zip(ds["doc_id"], ds["context"]):
        if context not in seen:
            seen.add(context)
            out.append((doc_id, context))
    return out


def first_questions(ds, n_docs: int, per_doc: int | None = None) -> list[int]:
    """Row indices of the questions of the first ``n_docs`` unique documents (`documents` order, by text), at most
    ``per_doc`` per document (the first ones in file order; ``None`` = all), in file order. ``ds`` as in
    `documents`."""
    measured = {text for _, text in documents(ds)[:n_docs]}
    count: dict[str, int] = {}
    indices = []
    for i, text in enumerate(ds["context"]):
        if text in measured and (per_doc is None or count.get(text, 0) < per_doc):
            count[text] = count.get(text, 0) + 1
            indices.append(i)
    return indices


def _plain_documents(path: Path, src: _Source) -> list[tuple[str, str | None, str]]:
    """(where, source id, text) of a documents JSONL / JSON array / CSV."""
    out = []
    found_cols = src.columns
    for where, rec in src.records:
        cols = found_cols if found_cols is not None else rec
        key = next((k for k in _DOC_TEXT_KEYS if k in cols), None)
        if key is None:
            raise _missing_columns_error(
                path,
                src.header_where if found_cols is not None else where,
                cols,
                ["'text'"],
                "'text' (or 'context') with optional 'id'/'doc_id' for documents; "
                "or a QA layout with a 'question' column (see load_qa_file)",
            )
        out.append((where, _get_id(path, where, rec, _DOC_ID_KEYS), _get_str(path, where, rec, key)))
    return out


def load_documents_file(
    path: str | os.PathLike,
    *,
    downsample_to: int | None = None,
    filter_label: str | None = "Y",
    with_sources: bool = False,
) -> list[tuple[str, str]] | list[tuple[str, str, dict]]:
    """Documents to stream into the memory (``mbc-hf adapt``): ``[(doc_id, text), ...]``, or with
    ``with_sources=True`` ``[(doc_id, text, metadata), ...]`` where metadata (stored in the bank by ``mbc-hf adapt``,
    printed by ``mbc-hf ask``) holds ``text``, the document's first words (`snippet`), and, for a document without an
    id of its own (a ``.txt`` line, a JSONL/CSV record without ``id``), ``source``: ``"<file name>:<line>"``, the
    line where it starts.

    Accepted files:

    * any QA file accepted by `load_qa_file` (detected by a ``question`` / ``qas`` key or
      the SQuAD ``data`` object): its unique documents, i.e.
      ``documents(load_qa_file(path, downsample_to=..., filter_label=...))``, so the
      stream matches the evaluated questions; paragraphs without questions are not included;
    * ``.txt`` / ``.text``: one document per non-empty line (blank lines are skipped),
      surrounding whitespace stripped, doc_id = `document_id` (SHA-1 prefix) of the text
      (content-addressed, so adapting the edited file again skips only unchanged lines);
    * JSON lines / JSON array / CSV with a ``text`` (or ``context``) field per record and
      an optional ``id`` / ``doc_id`` (string or integer; default SHA-1 prefix).

    Documents are unique by id, in first-appearance order: one text under two ids is two
    documents (as in `memorize`); a repeated text without an id of its own keeps its first id.
    ``downsample_to=N`` keeps the first N of them. Empty or whitespace-only documents in JSON/CSV records are
    skipped with an `EmptyDocumentWarning` that counts them (blank lines of a ``.txt`` file are just separators).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: everything `load_qa_file` raises; a record without ``text`` (the
            message lists the fields found and accepted); a non-string text; an id used
            for two different texts; a file without any document.
    """
    path = Path(path)
    _check_downsample(downsample_to)
    suffix = _base_suffix(path)
    if suffix in (".txt", ".text"):
        text = _read_text(path)
        items = [
            (f"line {i}", None, line.strip()) for i, line in enumerate(text.split("\n"), 1) if line.strip()
        ]
    else:
        src = _read_source(path)
        if src.squad is not None:
            is_qa = True
        else:
            keys = src.columns if src.columns is not None else (src.records[0][1] if src.records else {})
            is_qa = "question" in keys or "qas" in keys
        if is_qa:
            rows = _qa_rows(src, None, filter_label)
            docs = documents(_to_dataset(path, rows, downsample_to))
            return [(d, t, {"text": snippet(t)}) for d, t in docs] if with_sources else docs
        items = _plain_documents(path, src)
        n_empty = sum(1 for _, _, t in items if not t.strip())
        if n_empty:
            warnings.warn(
                f"{path}: skipped {n_empty} empty or whitespace-only document(s)",
                EmptyDocumentWarning,
                stacklevel=2,
            )
            items = [it for it in items if it[2].strip()]
    if not items:
        raise ValueError(f"{path}: no documents found")
    rows = [_Row(src_id, t, "", [], None, where) for where, src_id, t in items]
    doc_ids = _canonical_doc_ids(path, rows)  # raises on an id used for two texts
    # One text under two ids of the file stays two documents, as memorize(texts, doc_ids) stores them; a text
    # without an id of its own takes the id it had before (its SHA-1 or an earlier explicit id).
    out, seen = [], set()
    for r, doc_id in zip(rows, doc_ids):
        own_id = r.src_doc_id is not None
        doc_id = r.src_doc_id if own_id else doc_id
        if doc_id not in seen:
            seen.add(doc_id)
            if not with_sources:
                out.append((doc_id, r.context))
                continue
            meta = {"text": snippet(r.context)}
            if not own_id and r.where.startswith("line "):
                meta["source"] = f"{path.name}:{r.where[5:]}"
            out.append((doc_id, r.context, meta))
    return out if downsample_to is None else out[:downsample_to]


def snippet(text: str, words: int = 8, limit: int = 60) -> str:
    """The first ``words`` words of ``text`` (at most ``limit`` characters), with "…" when cut: how ``mbc-hf ask``
    shows a source."""
    parts = text.split()
    short = " ".join(parts[:words])
    if len(short) > limit:
        short = short[:limit].rstrip()
    return short + ("…" if short != " ".join(parts) else "")


from .synthetic_facts import chance_em, synthetic_facts, write_synthetic_facts  # noqa: E402,F401  (re-exported)

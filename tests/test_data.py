"""Tests of mbc_hf.data: QA file loaders (fixtures are written into tmp_path)."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import warnings
from pathlib import Path

import pytest

from mbc_hf.data import (
    FEATURES,
    EmptyDocumentWarning,
    documents,
    load_documents_file,
    load_qa_file,
    load_qa_files,
)

COLUMNS = ["doc_id", "context", "question", "answers", "question_id"]


def sha16(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


CTX_A0 = "Paris is the capital of France. The Eiffel Tower is in Paris."
CTX_A1 = "The Seine flows through Paris."
CTX_B0 = "Berlin is the capital of Germany."

SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "Paris",
            "paragraphs": [
                {
                    "context": CTX_A0,
                    "qas": [
                        {
                            "id": "q1",
                            "question": "What is the capital of France?",
                            "answers": [{"text": "Paris", "answer_start": 0}, {"text": "Paris", "answer_start": 0}],
                        },
                        {
                            "id": "q2",
                            "question": "Where is the Eiffel Tower?",
                            "answers": [{"text": "in Paris", "answer_start": 52},
                                         {"text": "Paris", "answer_start": 55}],
                        },
                    ],
                },
                {
                    "context": CTX_A1,
                    "qas": [{"id": "q3", "question": "What flows through Paris?",
                              "answers": [{"text": "The Seine", "answer_start": 0}]}],
                },
            ],
        },
        {
            "title": "Berlin",
            "paragraphs": [
                {
                    "context": CTX_B0,
                    "qas": [{"id": "q4", "question": "What is the capital of Germany?",
                              "answers": [{"text": "Berlin", "answer_start": 0}]}],
                },
                {  # same text as Paris#0: deduplicated, shares its doc_id
                    "context": CTX_A0,
                    "qas": [{"id": "q5", "question": "Of which country is Paris the capital?",
                              "answers": [{"text": "France", "answer_start": 24}]}],
                },
            ],
        },
    ],
}


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def paragraph_records():
    out = []
    for art in SQUAD["data"]:
        for i, p in enumerate(art["paragraphs"]):
            out.append(
                {
                    "paragraph_id": f"{art['title']}#{i}",
                    "title": art["title"],
                    "paragraph_index": i,
                    "context": p["context"],
                    "qas": [
                        {
                            "id": q["id"],
                            "question": q["question"],
                            "answers": {
                                "text": [a["text"] for a in q["answers"]],
                                "answer_start": [a["answer_start"] for a in q["answers"]],
                            },
                        }
                        for q in p["qas"]
                    ],
                }
            )
    return out


# ---------------------------------------------------------------- layouts


def test_squad_json(tmp_path):
    ds = load_qa_file(write(tmp_path / "dev.json", json.dumps(SQUAD)))
    assert ds.column_names == COLUMNS
    assert ds.features == FEATURES
    assert len(ds) == 5
    assert ds["question_id"] == ["q1", "q2", "q3", "q4", "q5"]
    assert ds["doc_id"] == ["Paris#0", "Paris#0", "Paris#1", "Berlin#0", "Paris#0"]  # dup text -> first id
    assert ds[1]["answers"] == ["in Paris", "Paris"]
    assert ds[0]["answers"] == ["Paris", "Paris"]  # duplicates kept, original order
    docs = documents(ds)
    assert docs == [("Paris#0", CTX_A0), ("Paris#1", CTX_A1), ("Berlin#0", CTX_B0)]


def test_paragraph_jsonl_equals_squad_json(tmp_path):
    a = load_qa_file(write(tmp_path / "dev.json", json.dumps(SQUAD)))
    b = load_qa_file(write_jsonl(tmp_path / "dev.paragraphs.jsonl", paragraph_records()))
    assert b.to_dict() == a.to_dict()
    # forced format and gzip are accepted too
    gz = tmp_path / "dev.paragraphs.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "dev.paragraphs.jsonl").read_bytes()))
    assert load_qa_file(gz, format="paragraphs").to_dict() == a.to_dict()


def test_streamingqa_csv_backslash_answers(tmp_path):
    rows = [
        ["Doc one text.", "Q1?", "alpha\\beta\\gamma"],
        ["Doc one text.", "Q2?", "delta"],
        ["Doc two text.", "Q3?", "eps\\"],  # trailing separator: empty piece dropped
    ]
    ds = load_qa_file(write_csv(tmp_path / "test.csv", ["text", "question", "answers"], rows))
    assert ds.column_names == COLUMNS
    assert ds["answers"] == [["alpha", "beta", "gamma"], ["delta"], ["eps"]]
    d1, d2 = sha16("Doc one text."), sha16("Doc two text.")
    assert ds["doc_id"] == [d1, d1, d2]
    assert ds["question_id"] == [f"{d1}:0", f"{d1}:1", f"{d2}:0"]
    assert documents(ds) == [(d1, "Doc one text."), (d2, "Doc two text.")]


def test_archivalqa_csv(tmp_path):
    header = ["question", "answer", "ans_paragraph", "ans_text", "doc_id", "para_num"]
    rows = [
        ["Who a?", "Ann", "Para 0 of 7.", "full 7", "7", "0"],
        ["Who b?", "Bob\\Rob", "Para 1 of 7.", "full 7", "7", "1"],  # 'answer' is never split
        ["Who c?", "Cy", "Para 0 of 7.", "full 7", "7", "0"],
    ]
    ds = load_qa_file(write_csv(tmp_path / "archival_test.csv", header, rows))
    assert ds["context"] == ["Para 0 of 7.", "Para 1 of 7.", "Para 0 of 7."]  # ans_paragraph, not ans_text
    assert ds["doc_id"] == ["7_0", "7_1", "7_0"]
    assert ds["answers"] == [["Ann"], ["Bob\\Rob"], ["Cy"]]
    assert ds["question_id"] == ["7_0:0", "7_1:0", "7_0:1"]


def test_archivalqa_subset_jsonl_label_filter(tmp_path):
    def rec(i, label, para_id, text):
        return {"id": f"total_{i}", "question": f"Q{i}?", "answer": f"a{i}", "label": label, "split": "train",
                "para_id": para_id, "nyt_doc_id": int(para_id.split("_")[0]), "para_index": 0,
                "answer_start": -1, "para_text": text}

    p = write_jsonl(tmp_path / "sub.jsonl",
                    [rec(1, "X", "5_0", "T5"), rec(2, "Y", "9_0", "T9"), rec(3, "Y", "5_0", "T5")])
    ds = load_qa_file(p)
    assert ds["question_id"] == ["total_2", "total_3"]
    assert ds["doc_id"] == ["9_0", "5_0"]
    assert ds["answers"] == [["a2"], ["a3"]]
    all_rows = load_qa_file(p, filter_label=None)
    assert all_rows["question_id"] == ["total_1", "total_2", "total_3"]
    assert load_qa_file(p, filter_label="X")["question_id"] == ["total_1"]


def test_several_files_concatenate_in_order_and_downsample_over_the_whole(tmp_path):
    squad = load_qa_file(write(tmp_path / "dev.json", json.dumps(SQUAD)))
    csv_path = write_csv(tmp_path / "more.csv", ["doc_id", "text", "question", "answers"],
                         [["x1", "Doc X.", "Qx?", "x"], ["y1", "Doc Y.", "Qy?", "y"]])
    both = load_qa_files([tmp_path / "dev.json", csv_path])
    assert list(both["question_id"]) == list(squad["question_id"]) + ["x1:0", "y1:0"]
    assert [d for d, _ in documents(both)] == [d for d, _ in documents(squad)] + ["x1", "y1"]
    n = len(documents(squad))
    first = load_qa_files([tmp_path / "dev.json", csv_path], downsample_to=n + 1)
    assert [d for d, _ in documents(first)] == [d for d, _ in documents(squad)] + ["x1"]
    assert load_qa_files(tmp_path / "dev.json").to_dict() == squad.to_dict()  # one path alone


def test_several_files_keep_one_id_per_document(tmp_path):
    a = write_csv(tmp_path / "a.csv", ["doc_id", "text", "question", "answers"], [["d1", "Same text.", "Q1?", "a"]])
    b = write_csv(tmp_path / "b.csv", ["doc_id", "text", "question", "answers"], [["d9", "Same text.", "Q2?", "b"]])
    assert list(load_qa_files([a, b])["doc_id"]) == ["d1", "d1"]  # one document, the first file's id
    clash = write_csv(tmp_path / "c.csv", ["doc_id", "text", "question", "answers"],
                      [["d1", "Other text.", "Q3?", "c"]])
    with pytest.raises(ValueError, match=r"doc_id 'd1' names different documents in .*a\.csv and .*c\.csv; rename"):
        load_qa_files([a, clash])
    with pytest.raises(ValueError, match="no files"):
        load_qa_files([])


def test_flat_jsonl_roundtrip_of_to_json(tmp_path):
    ds = load_qa_file(write(tmp_path / "dev.json", json.dumps(SQUAD)))
    out = tmp_path / "export.jsonl"
    ds.to_json(out)
    assert load_qa_file(out).to_dict() == ds.to_dict()


def test_downsample_keeps_first_unique_documents_in_order(tmp_path):
    rows = [
        ["D1", "q1", "a"], ["D2", "q2", "a"], ["D1", "q3", "a"], ["D3", "q4", "a"],
        ["D2", "q5", "a"], ["D4", "q6", "a"], ["D3", "q7", "a"],
    ]
    p = write_csv(tmp_path / "s.csv", ["text", "question", "answers"], rows)
    ds = load_qa_file(p, downsample_to=2)
    assert ds["question"] == ["q1", "q2", "q3", "q5"]  # all rows of D1, D2; file order kept
    assert [c for _, c in documents(ds)] == ["D1", "D2"]
    assert len(load_qa_file(p, downsample_to=3)) == 6
    assert len(load_qa_file(p, downsample_to=100)) == 7
    # the same on a SQuAD file with a duplicated paragraph text: 2 unique documents
    sq = load_qa_file(write(tmp_path / "dev.json", json.dumps(SQUAD)), downsample_to=2)
    assert sq["question_id"] == ["q1", "q2", "q3", "q5"]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="downsample_to"):
            load_qa_file(p, downsample_to=bad)


def test_empty_documents_skipped_with_warning(tmp_path):
    rows = [["D1", "q1", "a"], ["   ", "q2", "a"], ["", "q3", "a"], ["D2", "q4", "a"]]
    p = write_csv(tmp_path / "s.csv", ["text", "question", "answers"], rows)
    with pytest.warns(EmptyDocumentWarning, match=r"skipped 2 question\(s\) on 2 empty"):
        ds = load_qa_file(p)
    assert ds["question"] == ["q1", "q4"]


# ---------------------------------------------------------------- documents files


def test_load_documents_file_txt_and_jsonl(tmp_path):
    txt = write(tmp_path / "docs.txt", "First doc.\n\n  \nSecond doc.  \nFirst doc.\n")
    assert load_documents_file(txt) == [(sha16("First doc."), "First doc."), (sha16("Second doc."), "Second doc.")]

    jl = write_jsonl(tmp_path / "docs.jsonl",
                     [{"id": 3, "text": "A"}, {"text": "B"}, {"doc_id": "x", "text": "  "}, {"id": "z", "text": "A"}])
    with pytest.warns(EmptyDocumentWarning, match="skipped 1 empty"):
        docs = load_documents_file(jl)
    assert docs == [("3", "A"), (sha16("B"), "B"), ("z", "A")]  # one text, two ids: two documents, as memorize()
    assert load_documents_file(txt, downsample_to=1) == [(sha16("First doc."), "First doc.")]


def test_load_documents_file_from_qa_files(tmp_path):
    sq = write(tmp_path / "dev.json", json.dumps(SQUAD))
    assert load_documents_file(sq) == documents(load_qa_file(sq))
    assert [d for d, _ in load_documents_file(sq, downsample_to=2)] == ["Paris#0", "Paris#1"]
    p = write_csv(tmp_path / "s.csv", ["text", "question", "answers"], [["D1", "q", "a"], ["D1", "q2", "a"]])
    assert load_documents_file(p) == [(sha16("D1"), "D1")]


def test_load_documents_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"nodoc\.jsonl: line 2: missing required column.*'body'"):
        load_documents_file(write_jsonl(tmp_path / "nodoc.jsonl", [{"text": "a"}, {"body": "b"}]))
    with pytest.raises(ValueError, match=r"conflict\.jsonl: line 2: document id 'd' was already used"):
        load_documents_file(write_jsonl(tmp_path / "conflict.jsonl",
                                        [{"id": "d", "text": "a"}, {"id": "d", "text": "b"}]))
    with pytest.raises(ValueError, match="no documents"):
        load_documents_file(write(tmp_path / "empty.txt", "\n \n"))


# ---------------------------------------------------------------- errors


def test_bad_json_line_names_file_and_line(tmp_path):
    recs = paragraph_records()
    text = json.dumps(recs[0]) + "\n" + json.dumps(recs[1]) + "\n{not json}\n"
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 3: invalid JSON"):
        load_qa_file(write(tmp_path / "broken.jsonl", text))


def test_missing_column_lists_found_and_accepted(tmp_path):
    p = write_csv(tmp_path / "nocol.csv", ["text", "query", "answers"], [["D", "q", "a"]])
    with pytest.raises(ValueError) as ei:
        load_qa_file(p)
    msg = str(ei.value)
    assert "nocol.csv: line 1 (header)" in msg
    assert "'question'" in msg and "'query'" in msg and "accepted" in msg

    p = write_jsonl(tmp_path / "nocol.jsonl",
                    [{"context": "D", "question": "q", "answers": ["a"]}, {"context": "D", "question": "q2"}])
    with pytest.raises(ValueError, match=r"nocol\.jsonl: line 2: missing required column.*'answers' or 'answer'"
                                         r".*columns found: \['context', 'question'\]"):
        load_qa_file(p)


def test_bad_utf8_reports_line_and_byte_offset(tmp_path):
    raw = b"text,question,answers\nok,q,a\nbad \xff byte,q,a\n"
    with pytest.raises(ValueError, match=r"latin\.csv: line 3: invalid UTF-8 at byte offset 33"):
        load_qa_file(write(tmp_path / "latin.csv", raw))
    assert raw[33:34] == b"\xff"


def test_invalid_fields(tmp_path):
    base = {"context": "D", "question": "q", "answers": ["a"]}
    cases = [
        ({**base, "question": "  "}, r"line 2: empty 'question'"),
        ({**base, "question": 7}, r"line 2: field 'question' must be a string, got int"),
        ({**base, "context": ["D"]}, r"line 2: field 'context' must be a string, got list"),
        ({**base, "answers": ["a", 3]}, r"line 2: answers\[1\] must be a string"),
        ({**base, "answers": []}, r"line 2: no reference answers"),
    ]
    for i, (bad, pattern) in enumerate(cases):
        p = write_jsonl(tmp_path / f"f{i}.jsonl", [base, bad])
        with pytest.raises(ValueError, match=rf"f{i}\.jsonl: {pattern}"):
            load_qa_file(p)


def test_squad_json_errors_name_article_paragraph_and_question(tmp_path):
    bad = json.loads(json.dumps(SQUAD))
    bad["data"][1]["paragraphs"][1]["qas"][0]["question"] = ""
    with pytest.raises(ValueError,
                       match=r"bad\.json: data\[1\]\.paragraphs\[1\]\.qas\[0\] \(id 'q5'\): empty 'question'"):
        load_qa_file(write(tmp_path / "bad.json", json.dumps(bad)))
    with pytest.raises(ValueError, match=r"trunc\.json: line 1: invalid JSON"):
        load_qa_file(write(tmp_path / "trunc.json", json.dumps(SQUAD)[:-5]))
    with pytest.raises(ValueError, match="unknown format"):
        load_qa_file(tmp_path / "bad.json", format="xml")


# ---------------------------------------------------------------- real data


def _shared_data() -> Path:
    env = os.environ.get("MBC_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def test_real_squad_dev_paragraphs_downsampled():
    path = _shared_data() / "squad" / "dev.minus-holdout.paragraphs.jsonl"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path} (set MBC_SHARED_DATA to the shared/data directory)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_qa_file(path, downsample_to=50)
    assert ds.column_names == COLUMNS
    docs = documents(ds)
    assert len(docs) == 50
    assert docs[0][0] == "Super_Bowl_50#0"
    assert len(ds) == 754  # questions of the first 50 paragraphs
    assert len(set(ds["question_id"])) == len(ds)
    assert all(ds["answers"]) and all(isinstance(a, str) for row in ds["answers"] for a in row)


# ---------------------------------------------------------------- malformed files (docs/bad_inputs.md)


MALFORMED = [
    pytest.param("d.jsonl", b'{"text": "ok"}\n{"text": "b\xc3("}\n', load_documents_file,
                 r"d\.jsonl: line 2: invalid UTF-8 at byte offset 26", id="jsonl-bad-utf8"),
    pytest.param("d.txt", b"one\ntwo\nthr\xe9e\n", load_documents_file,
                 r"d\.txt: line 3: invalid UTF-8 at byte offset 11", id="txt-latin1"),
    pytest.param("d.jsonl.gz", gzip.compress(b'{"text": "ok"}\n{"text": "\xff"}\n'), load_documents_file,
                 r"d\.jsonl\.gz: line 2: invalid UTF-8 at decompressed byte offset 25", id="gz-bad-utf8"),
    pytest.param("d.jsonl.gz", gzip.compress(b'{"text": "ok"}\n' * 50)[:25], load_documents_file,
                 r"d\.jsonl\.gz: cannot read file", id="gz-truncated"),
    pytest.param("d.jsonl", b'{"text": "a\\ud800b"}\n', load_documents_file,
                 r"d\.jsonl: line 1: field 'text' holds a lone surrogate", id="lone-surrogate-text"),
    pytest.param("d.jsonl", b'{"id": "\\udfff", "text": "x"}\n', load_documents_file,
                 r"d\.jsonl: line 1: field 'id' holds a lone surrogate", id="lone-surrogate-id"),
    pytest.param("q.jsonl", b'{"context": "D", "question": "q", "answers": ["a\\udc00"]}\n', load_qa_file,
                 r"q\.jsonl: line 1: field 'answers\[0\]' holds a lone surrogate", id="lone-surrogate-answer"),
    pytest.param("q.json", json.dumps({"data": [{"title": "T\udc00", "paragraphs": []}]}).encode(), load_qa_file,
                 r"q\.json: data\[0\]: field 'title' holds a lone surrogate", id="lone-surrogate-title"),
    pytest.param("q.csv", b"text,question,answers\nD,q,a\nD,q,a,extra\n", load_qa_file,
                 r"q\.csv: line 3: 4 fields but the header has 3", id="csv-extra-field"),
    pytest.param("q.csv", b"text,question,answers\nD,q\n", load_qa_file,
                 r"q\.csv: line 2: missing value for 'answers'", id="csv-short-row"),
    pytest.param("d.json", b'[{"text": "a"}, 3]', load_documents_file,
                 r"d\.json: record 1: expected a JSON object, got int", id="json-array-non-object"),
    pytest.param("d.jsonl", b'{"text": "a"}\n["text"]\n', load_documents_file,
                 r"d\.jsonl: line 2: expected a JSON object per line, got list", id="jsonl-line-not-object"),
    pytest.param("d.jsonl", b'{"text": 5}\n', load_documents_file,
                 r"d\.jsonl: line 1: field 'text' must be a string, got int", id="text-not-str"),
    pytest.param("d.jsonl", b'{"id": [1], "text": "x"}\n', load_documents_file,
                 r"d\.jsonl: line 1: field 'id' must be a string or integer, got list", id="id-not-str"),
    pytest.param("d.jsonl", b"", load_documents_file, r"d\.jsonl: file is empty", id="empty-jsonl"),
    pytest.param("q.csv", b"", load_qa_file, r"q\.csv: file is empty \(no CSV header\)", id="empty-csv"),
]


@pytest.mark.parametrize("name, content, loader, match", MALFORMED)
def test_malformed_files_name_the_file_and_the_place(tmp_path, name, content, loader, match):
    with pytest.raises(ValueError, match=match):
        loader(write(tmp_path / name, content))


def test_a_csv_with_an_unterminated_quote_fails_with_file_and_line(tmp_path):
    path = write(tmp_path / "docs.csv", 'id,text\na,first document\nb,"second, never closed\nc,third\nd,fourth\n')
    with pytest.raises(ValueError, match=r'docs\.csv: line 3: malformed CSV: a quoted field .* never closed'):
        load_documents_file(path)

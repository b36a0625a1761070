"""Smoke test of benchmarks/qa_squad.py on the tiny random model and a 4-document SQuAD-style fixture.

All six rows run in-process through ``main()`` (fast); the default per-row child-process path ("spawn") is checked
once through the command line on one row, since every child pays the full library import (~5-10 s on a busy CPU).
"""

import importlib.util
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "qa_squad.py"

PARAGRAPHS = [
    ("Lakes", "Lake Baikal in Siberia is the deepest lake in the world. It holds about one fifth of the fresh "
              "water on the surface of the Earth.",
     [("Where is Lake Baikal?", "Siberia"), ("What is the deepest lake in the world?", "Lake Baikal")]),
    ("Lakes", "The Caspian Sea is the largest lake by area. It lies between Europe and Asia and its water is "
              "salty.",
     [("What is the largest lake by area?", "The Caspian Sea"), ("Is the Caspian water fresh or salty?", "salty")]),
    ("Music", "Ludwig van Beethoven was born in Bonn in 1770. He wrote nine symphonies and became deaf late in "
              "his life.",
     [("Where was Beethoven born?", "Bonn"), ("How many symphonies did Beethoven write?", "nine")]),
    ("Music", "The violin has four strings tuned in fifths. Antonio Stradivari built famous violins in Cremona.",
     [("How many strings does a violin have?", "four"), ("Where did Stradivari build violins?", "Cremona")]),
]


def write_fixture(path: Path) -> Path:
    index: dict[str, int] = {}
    with open(path, "w", encoding="utf-8") as f:
        for n, (title, context, qas) in enumerate(PARAGRAPHS):
            i = index[title] = index.get(title, -1) + 1
            f.write(json.dumps({
                "paragraph_id": f"{title}#{i}", "title": title, "paragraph_index": i, "context": context,
                "qas": [{"id": f"q{n}-{k}", "question": q,
                         "answers": {"text": [a], "answer_start": [context.index(a)]}}
                        for k, (q, a) in enumerate(qas)]}) + "\n")
    return path


def load_bench():
    spec = importlib.util.spec_from_file_location("qa_squad", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_row(row):
    for key in ("em", "f1", "prefix_em", "bytes_per_doc", "adapt_ms_per_doc", "query_ms", "peak_rss_mib"):
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (row["row"], key, row[key])
    assert 0 <= row["em"] <= 100 and 0 <= row["f1"] <= 100 and row["peak_rss_mib"] > 0


def test_all_rows_in_process(tmp_path):
    bench = load_bench()
    data = write_fixture(tmp_path / "dev.paragraphs.jsonl")
    out = tmp_path / "results"
    bench.main(["--model", "tiny", "--data", str(data), "--downsample-to", "4", "--output-dir", str(out),
                "--in-process", "--threads", "1", "--max-new-tokens", "4",
                "--rows", "closed_book,empty,mbc,dense,bm25,gold"])  # all documents asked: no unrelated ones
    results = json.loads((out / "results.json").read_text())
    rows = {r["row"]: r for r in results["rows"]}
    assert list(rows) == ["closed_book", "empty", "mbc", "dense", "bm25", "gold"]
    for row in rows.values():
        check_row(row)
    assert results["n_docs"] == 4 and results["n_questions"] == 8
    assert results["versions"]["torch"] and results["versions"]["transformers"]
    assert 0.0 <= rows["bm25"]["retrieval_top1"] <= 1.0
    assert rows["bm25"]["retrieval_top1"] >= 0.5  # the fixture's questions share words with their passage
    assert rows["closed_book"]["bytes_per_doc"] == rows["empty"]["bytes_per_doc"] == 0
    text_bytes = sum(len(c.encode()) for _, c, _ in PARAGRAPHS) / 4
    assert rows["gold"]["bytes_per_doc"] == rows["bm25"]["bytes_per_doc"] == pytest.approx(text_bytes)
    assert rows["mbc"]["bank_type"] == "CompressedMemoryBank" and rows["dense"]["bank_type"] == "DenseMemoryBank"
    assert 0 < rows["mbc"]["bytes_per_doc"] < rows["dense"]["bytes_per_doc"]
    assert rows["gold"]["prompt"] == "plain"  # the tiny tokenizer has no chat template: fallback + warning
    assert any("no chat template" in w for w in rows["gold"]["warnings"])
    md = (out / "results.md").read_text()
    assert "gold passage in context" in md and "--model tiny" in md
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and set(rows) <= set(preds[0])


def test_unrelated_bank_row_holds_as_many_documents_none_of_them_asked_about(tmp_path):
    bench = load_bench()
    data = write_fixture(tmp_path / "dev.paragraphs.jsonl")
    bench.main(["--model", "tiny", "--data", str(data), "--downsample-to", "2", "--output-dir", str(tmp_path / "r"),
                "--in-process", "--threads", "1", "--max-new-tokens", "4", "--rows", "mbc,unrelated"])
    rows = {r["row"]: r for r in json.loads((tmp_path / "r" / "results.json").read_text())["rows"]}
    assert rows["unrelated"]["bank_type"] == "CompressedMemoryBank"
    assert sorted(rows["unrelated"]["bank_doc_ids"]) == ["Music#0", "Music#1"]  # the file's last two documents
    assert rows["unrelated"]["bytes_per_doc"] > 0 and rows["unrelated"]["n_questions"] == 4
    check_row(rows["unrelated"])
    with pytest.raises(ValueError, match="lower --downsample-to"):
        bench.main(["--model", "tiny", "--data", str(data), "--downsample-to", "4", "--output-dir",
                    str(tmp_path / "r4"), "--in-process", "--max-new-tokens", "4", "--rows", "unrelated"])


@pytest.mark.slow  # a subprocess that imports torch (issue 37: the fast tier skips it)
def test_rows_in_spawned_children(tmp_path):
    data = write_fixture(tmp_path / "dev.paragraphs.jsonl")
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(BENCH), "--model", "tiny", "--data", str(data), "--downsample-to",
                           "2", "--rows", "mbc", "--output-dir", str(out), "--threads", "1", "--max-new-tokens",
                           "4"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["isolation"] == "spawn" and [r["row"] for r in results["rows"]] == ["mbc"]
    check_row(results["rows"][0])
    assert results["n_docs"] == 2 and results["n_questions"] == 4
    assert "MBC, compressed bank" in proc.stdout


def test_memory_gain_script_spread_takes_documents_from_the_whole_file(tmp_path):
    from mbc_hf.testing import tiny_mbc_model

    spec = importlib.util.spec_from_file_location("memory_gain", BENCH.parent / "memory_gain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = write_fixture(tmp_path / "dev.paragraphs.jsonl")
    tiny_mbc_model(reconstruction_loss_weight=0.5).save_pretrained(tmp_path / "model")
    for spread, expected in ((False, ["Lakes#0", "Lakes#1"]), (True, ["Lakes#0", "Music#0"])):
        out = tmp_path / f"gain-{spread}.json"
        module.main(["--model", str(tmp_path / "model"), "--data", str(data), "--docs", "2", "--batch-size", "2",
                     "--output", str(out)] + (["--spread"] if spread else []))
        result = json.loads(out.read_text())
        assert result["doc_ids"] == expected and result["spread"] is spread
        assert result["memory_gain_unrelated"] == pytest.approx(result["nll_unrelated"] - result["nll_gold"])
        assert math.isfinite(result["reconstruction_gain"])
        assert result["standard_error"]["memory_gain"] is None  # one batch: no spread to estimate
    module.main(["--model", str(tmp_path / "model"), "--data", str(data), "--docs", "4", "--batch-size", "2",
                 "--output", str(tmp_path / "gain4.json")])
    result = json.loads((tmp_path / "gain4.json").read_text())
    assert result["doc_ids"] == ["Lakes#0", "Lakes#1", "Music#0", "Music#1"]
    assert 0 <= result["standard_error"]["memory_gain"] < float("inf")
    assert 1 <= result["distinct_codes_per_doc"] <= 4 and 0 <= result["code_overlap_with_unrelated"] <= 1
    module.main(["--model", str(tmp_path / "model"), "--data", str(data), "--docs", "4", "--batch-size", "4",
                 "--article-pairs", "--output", str(tmp_path / "pairs.json")])
    result = json.loads((tmp_path / "pairs.json").read_text())
    assert result["article_pairs"] and result["doc_ids"] == ["Lakes#0", "Lakes#1", "Music#0", "Music#1"]
    for name in ("other_article", "same_article"):
        assert result[f"memory_gain_{name}"] == pytest.approx(result[f"nll_{name}"] - result["nll_gold"])
        ci = result["per_question"][f"memory_gain_{name}"]  # one question per document: 4 questions
        assert ci["n"] == 4 and ci["low"] <= ci["mean"] <= ci["high"]
        assert ci["excludes_zero"] == (ci["low"] > 0 or ci["high"] < 0)
    assert "nll_unrelated" not in result


@pytest.mark.parametrize("distill", [0.0, 1.0], ids=["qa-only", "distillation"])
def test_train_step_script_splits_a_step_into_its_phases(tmp_path, distill):
    spec = importlib.util.spec_from_file_location("train_step", BENCH.parent / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = write_fixture(tmp_path / "train.paragraphs.jsonl")
    out = tmp_path / "step.json"
    median = module.main(["--model", "tiny", "--data", str(data), "--batch-size", "4", "--steps", "2",
                          "--distillation-weight", str(distill), "--output", str(out)])
    assert json.loads(out.read_text())["median_ms"] == median and json.loads(out.read_text())["batch_size"] == 4
    teacher = median.get("LM decoder reading the document (teacher, no grad)", 0.0)
    assert (teacher > 0) == (distill > 0)  # the teacher runs only when distilling, and without grad
    assert median["LM reading the prefix (calls with grad: QA, reconstruction)"] > 0
    assert 0 < median["document encoder backbone"] <= median["amortization network (incl. backbone)"]
    modules = median["forward, total"] - median["forward, rest (losses, masks)"]
    assert 0 < modules <= median["forward, total"]
    parts = median["collate"] + median["forward, total"] + median["backward"] + median["optimizer step"]
    assert parts == pytest.approx(median["step, total"], rel=0.05)


def test_train_step_script_with_the_encoder_state_cache_skips_the_document_encoder(tmp_path):
    spec = importlib.util.spec_from_file_location("train_step", BENCH.parent / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = write_fixture(tmp_path / "train.paragraphs.jsonl")
    median = module.main(["--model", "tiny", "--data", str(data), "--batch-size", "4", "--steps", "2",
                          "--encoder-state-cache"])
    assert median["document encoder backbone"] == 0  # the warm-up step stored every document's states
    assert median["amortization network (incl. backbone)"] > 0  # the readout still runs, with gradients


def test_default_rows_leave_out_the_compressed_bank_for_a_model_trained_without_vq(tmp_path):
    from mbc_hf.testing import tiny_mbc_model

    bench = load_bench()
    tiny_mbc_model(use_vq=False).save_pretrained(tmp_path / "novq")
    tiny_mbc_model().save_pretrained(tmp_path / "vq")
    data = str(write_fixture(tmp_path / "dev.paragraphs.jsonl"))
    novq = bench.parse_args(["--model", str(tmp_path / "novq"), "--data", data])
    # no addressing: no addressing rows; no --passage-reader: no rag row
    learned = [r for r in bench.ROWS if r not in bench.VOCABULARY_ROWS and r != "rag"]
    assert novq.rows == [r for r in learned if r not in ("mbc", "unrelated")]
    assert bench.parse_args(["--model", str(tmp_path / "vq"), "--data", data]).rows == learned
    asked = bench.parse_args(["--model", str(tmp_path / "novq"), "--data", data, "--rows", "mbc"])
    assert asked.rows == ["mbc"]  # asked for explicitly: kept, and the row itself raises its clear error


def test_qa_squad_and_memory_gain_on_a_vocabulary_codebook_model(tmp_path):
    """A vocabulary-codebook checkpoint: qa_squad leaves out the dense row (token ids lose nothing) and labels the
    bank row by its codebook; memory_gain.py scores it on article pairs (no reconstruction targets: it has none)."""
    from mbc_hf.testing import tiny_mbc_model

    model = tiny_mbc_model(codebook_type="vocabulary")
    model.codebook.fit([model.tokenizer(c, add_special_tokens=False)["input_ids"] for _, c, _ in PARAGRAPHS])
    model.save_pretrained(tmp_path / "model")
    data = write_fixture(tmp_path / "dev.paragraphs.jsonl")
    bench = load_bench()
    assert bench.parse_args(["--model", str(tmp_path / "model"), "--data", str(data)]).rows == \
        [r for r in bench.ROWS if r not in ("dense", "rag", *bench.HYBRID_MODEL_ROWS)]  # those need their readers
    with pytest.raises(SystemExit):  # the trained hybrid reader's rows name the folder they need
        bench.parse_args(["--model", str(tmp_path / "model"), "--data", str(data), "--rows", "hybrid_trained"])
    bench.main(["--model", str(tmp_path / "model"), "--data", str(data), "--downsample-to", "4", "--output-dir",
                str(tmp_path / "results"), "--in-process", "--threads", "1", "--max-new-tokens", "3",
                "--rows", "empty,mbc,mbc_k1,oracle,bank_t12,hybrid,hybrid_trained,bank_hybrid_reader",
                "--hybrid-model", str(tmp_path / "model"), "--questions", "5", "--question-seed", "1"])
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    rows = {r["row"]: r for r in results["rows"]}
    assert results["n_docs"] == 4 and results["n_questions"] == 5  # the bank holds the whole stream
    for name in ("mbc", "mbc_k1", "oracle", "bank_t12", "hybrid"):
        check_row(rows[name])
    assert "vocabulary codebook" in rows["mbc"]["label"] and rows["mbc"]["bank_type"] == "CompressedMemoryBank"
    assert rows["mbc"]["retrieval_top1"] >= 0.5  # the fixture's questions share rare words with their paragraph
    assert rows["mbc"]["retrieval_top1"] <= rows["mbc"]["retrieval_top3"] == rows["mbc_k1"]["retrieval_top3"]
    T = model.config.num_context_tokens
    assert rows["mbc"]["code_bytes_per_doc"] == 2 * T and rows["bank_t12"]["code_bytes_per_doc"] == 2 * 12
    assert rows["mbc"]["id_bytes_per_doc"] > 0 and 0 <= rows["hybrid"]["retrieval_top1"] <= 1
    assert "retrieval_top1" not in rows["empty"]
    # --hybrid-model is the same checkpoint here: its rows read as hybrid and mbc do
    for name, same in (("hybrid_trained", "hybrid"), ("bank_hybrid_reader", "mbc")):
        assert rows[name]["f1"] == rows[same]["f1"] and rows[name].get("retrieval_top1") == rows[same]["retrieval_top1"]
    spec = importlib.util.spec_from_file_location("memory_gain", BENCH.parent / "memory_gain.py")
    gain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gain)
    gain.main(["--model", str(tmp_path / "model"), "--data", str(data), "--docs", "4", "--batch-size", "4",
               "--article-pairs", "--output", str(tmp_path / "pairs.json")])
    result = json.loads((tmp_path / "pairs.json").read_text())
    assert result["memory_gain_other_article"] == pytest.approx(result["nll_other_article"] - result["nll_gold"])
    assert "reconstruction_gain" not in result and 1 <= result["distinct_codes_per_doc"] <= 4


def test_synthetic_facts_benchmark_rows_and_keys(tmp_path):
    """benchmarks/synthetic_facts.py on the tiny model: every memory trains, each bank size gets a row, the JSON
    has the keys of the issue (rows of memory/addressing/bank_docs/em/f1/answer_nll, chance_em), and no document is
    truncated (the first runs lost the attributes: the tiny byte-level tokenizer spent about 150 tokens on one)."""
    spec = importlib.util.spec_from_file_location("synthetic_facts_bench", BENCH.parent / "synthetic_facts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "synthetic.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bench.main(["--model", "tiny", "--max-steps", "2", "--minutes", "0", "--train-entities", "16",
                    "--test-entities", "10", "--bank-sizes", "1,4,10", "--questions-docs", "4", "--pretrain-steps", "2",
                    "--memories", "learned,learned_topk,vocabulary", "--work-dir", str(tmp_path / "w"),
                    "--output", str(out)])
    assert not [w for w in caught if "truncated" in str(w.message)]
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert {(r["memory"], r["bank_docs"]) for r in rows} >= {(m, n) for m in ("learned", "learned_topk", "vocabulary")
                                                              for n in (1, 4, 10)}
    assert {"empty", "closed_book"} <= {r["memory"] for r in rows}
    assert all(set(r) == {"memory", "addressing", "bank_docs", "em", "f1", "answer_nll", "steps", "warmup_end",
                          "resets", "distinct_codes", "bytes_per_doc", "pct_of_float_bank"} for r in rows)
    # the top-k model's codes are also read by set aggregation, at every bank size but 1
    assert {r["bank_docs"] for r in rows if r["memory"] == "learned_topk" and r["addressing"] == "all"} == {4, 10}
    learned = [r for r in rows if r["memory"].startswith("learned")]
    assert all(1 <= r["distinct_codes"] <= 512 and r["resets"] >= 0 and r["steps"] == 2 for r in learned)
    # the tiny model's T = 4 codes of K = 128 are 4 uint8 bytes, against 4 vectors of 32 fp32 in MAC's float bank
    assert all(r["bytes_per_doc"] == 4 and r["pct_of_float_bank"] == 100 * 4 / (4 * 32 * 4) for r in learned)
    assert 1 < record["chance_em"] < 7
    assert all(math.isfinite(r["answer_nll"]) for r in rows if r["memory"] != "closed_book")


class _EntityKey:
    """A key encoder (`mbc_hf.compact_key.SentenceEncoder`'s interface) whose embeddings are one-hot in the entity a
    text names: a question's key then points at its own document (``right``) or at the next one in its group (not
    ``right``). Texts are matched without case, spaces or punctuation (the reader decodes questions from tokens)."""

    dim = 16

    def __init__(self, test, right: bool):
        self.entity = {}  # normalised text -> index of its document
        docs = list(dict.fromkeys(test["doc_id"]))
        for row in test:
            self.entity[self._norm(row["context"])] = docs.index(row["doc_id"])
            self.entity[self._norm(row["question"])] = -1 - docs.index(row["doc_id"])  # a question: negative
        self.right = right

    @staticmethod
    def _norm(text):
        return "".join(ch for ch in text.lower() if ch.isalnum())

    def fingerprint(self):
        return f"entity-key-{self.right}"

    def embed(self, texts):
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            j = self.entity[self._norm(t)]
            out[i, j if j >= 0 else (-1 - j if self.right else (-1 - j) ^ 1)] = 1.0  # j ^ 1: the other of a pair
        return out

    def keys(self, texts):
        from mbc_hf.compact_key import binarize

        return binarize(self.embed(texts))


def test_key_addressed_rows_read_the_document_the_key_ranks_first():
    """synthetic_facts.py --key-addressing, through the package's compact-key addressing of learned codes: with a
    key that finds each question's document, the row equals reading the gold document alone (same EM and answer NLL
    as bank size 1); with a key that points at the other document of each pair, it reads that one (key_top1 0,
    another NLL)."""
    spec = importlib.util.spec_from_file_location("synthetic_facts_bench", BENCH.parent / "synthetic_facts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from mbc_hf.data import synthetic_facts
    from mbc_hf.factory import build

    test = synthetic_facts(8, "test", 0)
    torch.manual_seed(0)
    model = build("tiny", "tiny-bert", max_document_length=256, codebook_type="learned",
                  aggregation="histogram", corpus=list(test["context"]) + list(test["question"]),
                  vocab_size=1000, addressing_key="minilm-binary").eval()
    gold = bench.evaluate(model, test, 1, 8)
    for right in (True, False):
        model.reader.key.encoder = _EntityKey(test, right=right)
        found = bench.evaluate(model, test, 2, 8, key=True)
        if right:
            assert found["key_top1"] == 1.0 and found["n_questions"] == gold["n_questions"]
            assert found["em"] == gold["em"] and math.isclose(found["answer_nll"], gold["answer_nll"], rel_tol=1e-5)
        else:
            assert found["key_top1"] == 0.0 and not math.isclose(found["answer_nll"], gold["answer_nll"],
                                                                 rel_tol=1e-5)


def test_codes_diagnostic_scores_every_selection_against_bm25(tmp_path):
    """benchmarks/codes_diagnostic.py on the fixture with a tiny tokenizer: one row per selector × whole words × T
    plus BM25's, accuracies and recalls are shares, and more codes never lower answer recall."""
    from mbc_hf.testing import tiny_tokenizer

    tiny_tokenizer(vocab_size=600, corpus=[c for _, c, _ in PARAGRAPHS]).save_pretrained(tmp_path / "tok")
    data = write_fixture(tmp_path / "qa.jsonl")
    spec = importlib.util.spec_from_file_location("codes_diagnostic", BENCH.parent / "codes_diagnostic.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    record = bench.main(["--base-model", str(tmp_path / "tok"), "--train-file", str(data), "--data", str(data),
                         "--docs", "4", "--questions", "8", "--sizes", "4,64", "--output", str(tmp_path / "c.json")])
    rows = record["rows"]
    assert len(rows) == 1 + 2 * 2 * 2 and rows[0]["codes"].startswith("BM25")
    assert all(0 <= r[k] <= 1 for r in rows for k in ("top1", "top3", "answer_recall"))
    for few, many in zip(rows[1::2], rows[2::2]):
        assert (few["T"], many["T"]) == (4, 64) and many["answer_recall"] >= few["answer_recall"]
    assert rows[0]["top1"] > 0.5  # BM25 finds most of these documents
    assert json.loads((tmp_path / "c.json").read_text())["n_docs"] == 4


@pytest.mark.slow  # a subprocess that imports torch (issue 37: the fast tier skips it)
def test_bank_scale_benchmark_writes_the_issue_keys(tmp_path):
    """benchmarks/bank_scale.py at two small sizes (its 100k/1M/10M run is in benchmarks/README.md): the JSON has
    one row per size with the keys of the issue, and the sharded bank's bytes per document match T=12 uint16 codes
    plus a short id."""
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(BENCH.parent / "bank_scale.py"), "--docs", "3000", "6000", "--questions",
                    "5", "--end-to-end-docs", "0", "--max-postings", "1000000", "--output", str(out)], check=True,
                   timeout=300)
    sizes = json.loads(out.read_text())["sizes"]
    assert [s["docs"] for s in sizes] == [3000, 6000]
    for s in sizes:
        assert {"docs", "bytes_per_doc", "save_s", "append_s", "load_s", "rss_mb", "query_ms_p50",
                "query_ms_p95"} <= set(s)
        assert 24 + 3 < s["bytes_per_doc"] < 40 and s["query_ms_p95"] >= s["query_ms_p50"] > 0
        # a cap longer than any posting list is the exact search: the same documents and scores
        assert s["approx_recall"] == s["approx_same_scores"] == 1.0


def test_rag_row_reads_the_bm25_passage_with_the_trained_passage_reader(tmp_path):
    """train_passage_reader.py fits a LoRA adapter on (passage in prompt -> answer) and qa_squad's rag row reads
    the same BM25 passages as the bm25 row through it."""
    from transformers import AutoModelForCausalLM

    from mbc_hf.testing import tiny_lm_config, tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(tiny_lm_config("llama", len(tok), tok.pad_token_id, tok.bos_token_id,
                                                    tok.eos_token_id)).save_pretrained(base)
    tok.save_pretrained(base)
    data = write_fixture(tmp_path / "dev.paragraphs.jsonl")
    spec = importlib.util.spec_from_file_location("train_passage_reader", BENCH.parent / "train_passage_reader.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    reader = tmp_path / "reader"
    assert trainer.main(["--train-file", str(data), "--output-dir", str(reader), "--base-model", str(base),
                         "--max-steps", "3", "--batch-size", "4", "--warmup-steps", "0", "--logging-steps", "1"]) == 0
    log = json.loads((reader / "training.json").read_text())
    assert log["steps"] == 3 and log["base_model"] == str(base) and math.isfinite(log["train_loss"])
    bench = load_bench()
    lm = bench.passage_reader(str(reader))
    lora_b = [p for n, p in lm.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: LoRA B starts at zero
    assert {n.split(".")[-4] for n, _ in lm.named_parameters() if "lora_A" in n} == {"k_proj", "v_proj"}
    with pytest.raises(SystemExit):  # the rag row without its reader is a usage error
        bench.parse_args(["--model", "tiny", "--data", str(data), "--rows", "rag"])
    out = tmp_path / "results"
    bench.main(["--model", "tiny", "--data", str(data), "--downsample-to", "4", "--output-dir", str(out),
                "--in-process", "--threads", "1", "--max-new-tokens", "4", "--rows", "bm25,rag",
                "--passage-reader", str(reader)])
    rows = {r["row"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert list(rows) == ["bm25", "rag"]
    check_row(rows["rag"])
    for key in ("retrieval_top1", "retrieval_top3", "example_prompt", "bytes_per_doc"):
        assert rows["rag"][key] == rows["bm25"][key], key  # the same passages in the same prompt


def test_bytes_quality_points_and_plot(tmp_path):
    """benchmarks/bytes_quality.py: content bytes leave doc ids out, a hybrid point adds the text's bytes to the
    codes', the LM codec's point is its bits per byte times the text's bytes at RAG's F1; the plot is written, and
    results of another stream are refused."""
    spec = importlib.util.spec_from_file_location("bytes_quality", BENCH.parent / "bytes_quality.py")
    bq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bq)
    rows = [{"row": "mbc", "f1": 24.0, "bytes_per_doc": 113.0, "code_bytes_per_doc": 96.0},
            {"row": "mbc_key", "f1": 25.0, "bytes_per_doc": 161.0, "code_bytes_per_doc": 96.0, "key_bytes_per_doc": 48},
            {"row": "rag", "f1": 46.0, "bytes_per_doc": 800.0},
            {"row": "hybrid_trained", "f1": 47.0, "bytes_per_doc": 113.0, "code_bytes_per_doc": 96.0},
            {"row": "empty", "f1": 8.0, "bytes_per_doc": 0.0}]
    res = {"rows": rows, "n_docs": 10, "n_questions": 5, "args": {"question_seed": 0}, "data": "dev.jsonl"}
    codec = {"summary": {"record_bytes_per_doc": 90.0, "utf8_bytes_per_doc": 600.0}}
    pts = {p["label"]: p for p in bq.points([res], codec)}
    assert pts["T = 48 (default)"]["bytes"] == 96 and pts["T = 48 + 48-byte key"]["bytes"] == 144
    assert pts["hybrid, reader trained hybrid"]["bytes"] == 96 + 800
    codec_point = next(p for p in pts.values() if p["family"] == "LM codec")
    assert codec_point["bytes"] == pytest.approx(90 * 8 / 600 * 800 / 8) and codec_point["f1"] == 46.0
    (tmp_path / "a.json").write_text(json.dumps(res))
    bq.main(["--results", str(tmp_path / "a.json"), "--output-dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "bytes_quality.png").stat().st_size > 1000
    (tmp_path / "b.json").write_text(json.dumps({**res, "n_questions": 6}))
    with pytest.raises(SystemExit, match="different streams"):
        bq.main(["--results", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--output-dir", str(tmp_path)])

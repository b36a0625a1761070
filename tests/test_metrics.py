"""Tests of mbc_hf.metrics: SQuAD EM/F1, the MBC/MAC prefix EM and the offline evaluate module."""

from __future__ import annotations

import pytest

from mbc_hf.metrics import (
    METRIC_DIR,
    exact_match,
    f1,
    normalize_answer,
    prefix_exact_match,
    shortest_reference,
    squad_scores,
)

# (prediction, references, EM, F1, prefix EM) -- computed by hand
CASES = [
    # norm pred "eiffel tower paris" vs "eiffel tower": P=2/3, R=1 -> F1 = 2*(2/3)/(5/3) = 0.8;
    # the prefix of length 12 is "eiffel tower" -> prefix EM 1
    ("the Eiffel Tower, Paris", ["Eiffel Tower"], 0.0, 0.8, 1.0),
    # official EM/F1 take the max over references; the prefix EM uses only the shortest
    # reference ("Broncos" -> "broncos"), and "denver " != "broncos"
    ("Denver Broncos", ["Broncos", "Denver Broncos"], 1.0, 1.0, 0.0),
    # "paris" vs "city of paris": P=1, R=1/3 -> F1 = 2*(1/3)/(4/3) = 0.5
    ("Paris", ["The city of Paris"], 0.0, 0.5, 0.0),
    # punctuation and case removed: "1000 dollars" equals the second reference
    ("1,000 Dollars.", ["$1000", "1000 dollars"], 1.0, 1.0, 1.0),
]


def test_normalize_answer():
    assert normalize_answer("The  Quick, brown\tfox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theater") == "theater"  # articles only as whole words
    assert normalize_answer("A.B.C.") == "abc"
    assert normalize_answer("  ") == ""


@pytest.mark.parametrize("pred,refs,em,f1_value,pem", CASES)
def test_hand_computed_scores(pred, refs, em, f1_value, pem):
    assert exact_match(pred, refs) == em
    assert f1(pred, refs) == pytest.approx(f1_value)
    assert prefix_exact_match(pred, refs) == pem


def test_prefix_em_details():
    assert shortest_reference(["abc", "xy", "zw"]) == "xy"  # first on ties
    assert prefix_exact_match("Eiffel Towers", ["Eiffel Tower"]) == 1.0  # character-level cut
    assert prefix_exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert prefix_exact_match("anything", "The") == 1.0  # gold normalizes to "": reference-code quirk
    assert exact_match("Paris", "paris") == 1.0  # a bare str is one reference
    # empty prediction against an article-only answer: official EM 1, F1 0 (no tokens)
    assert exact_match("", ["a"]) == 1.0 and f1("", ["a"]) == 0.0


def test_squad_scores_percent():
    preds = [c[0] for c in CASES]
    refs = [c[1] for c in CASES]
    scores = squad_scores(preds, refs)
    assert scores["n"] == 4
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (0.8 + 1 + 0.5 + 1) / 4)
    assert scores["prefix_exact_match"] == pytest.approx(50.0)
    assert set(scores) == {"exact_match", "f1", "prefix_exact_match", "n"}


def test_input_errors():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        squad_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no predictions"):
        squad_scores([], [])
    with pytest.raises(ValueError, match=r"example 1: .*empty list"):
        squad_scores(["a", "b"], [["a"], []])
    with pytest.raises(TypeError):
        exact_match(None, ["a"])
    with pytest.raises(TypeError):
        f1("a", ["a", 1])


def test_metric_module_is_packaged_and_standalone():
    src = (METRIC_DIR / "mbc_squad.py").read_text(encoding="utf-8")
    assert "from ." not in src and "import mbc_hf" not in src and "from mbc_hf" not in src


def test_evaluate_module_offline_matches_pure_functions(monkeypatch):
    """load_metric() with HF_EVALUATE_OFFLINE=1 / HF_HUB_OFFLINE=1 and every socket blocked."""
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import socket

    import evaluate
    import huggingface_hub.constants

    from mbc_hf.metrics import load_metric

    # the flags are read at import time: also patch them in case evaluate was imported earlier
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    preds = [c[0] for c in CASES] + ["", "Berlin"]
    refs = [c[1] for c in CASES] + [["a"], ["Paris", "Berlin, Germany"]]
    expected = squad_scores(preds, refs)

    m = load_metric()
    assert type(m).__module__.startswith("evaluate_modules.metrics.mbc_squad")
    out = m.compute(predictions=preds, references=refs)
    m.add_batch(predictions=preds[:3], references=refs[:3])
    m.add_batch(predictions=preds[3:], references=refs[3:])
    batched = m.compute()
    for result in (out, batched):
        assert result.keys() == expected.keys()
        for k, v in expected.items():
            assert result[k] == pytest.approx(v), k
    # EM hits: 2 of the 4 CASES and "" vs "a" (both normalize to ""); "berlin" != "berlin germany"
    assert out["exact_match"] == pytest.approx(50.0)

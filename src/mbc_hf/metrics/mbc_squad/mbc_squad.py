# Copyright the mbc-hf authors. Licensed under the Apache License, Version 2.0.
"""SQuAD-style answer scoring for MBC / MAC evaluation, as an offline `evaluate` metric.

This file is deliberately standalone (no relative imports; only the standard library, plus
`datasets` and `evaluate` for the metric class): `evaluate.load(<directory of this file>)` copies it into the
`evaluate` module cache and imports it from there. The plain scoring functions at module
level are also re-exported by `mbc_hf.metrics`, so the code exists exactly once.

Definitions (all comparisons are on `normalize_answer` output):

* `exact_match` -- official SQuAD v1.1 EM: 1.0 if the normalized prediction equals the
  normalized form of ANY reference, else 0.0.
* `f1` -- official SQuAD v1.1 token F1 (bag of whitespace tokens), max over references;
  0.0 when there is no common token (also when both sides normalize to nothing).
* `prefix_exact_match` -- the variant used by the MBC / MAC / CaMeLS reference code
  (`exact_match(..., match_length=False)` in their utils): the gold answer is the SHORTEST
  reference by raw character length (`min(refs, key=len)`, first one on ties); the
  normalized prediction is cut to the length (in characters) of the normalized gold and
  compared to it. Extra generated text after the answer is therefore ignored. Note that
  the cut is character-level ("eiffel towers" matches gold "eiffel tower") and that a gold
  answer which normalizes to the empty string (e.g. "The") matches every prediction.
"""

from __future__ import annotations

import re
import string
import sys
from collections import Counter

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1",
    "prefix_exact_match",
    "shortest_reference",
    "squad_scores",
    "MbcSquad",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Official SQuAD v1.1 normalization.

    Lower-case, remove ASCII punctuation (`string.punctuation`), remove the articles
    a/an/the (as whole words), collapse runs of whitespace to single spaces and strip.
    """
    if not isinstance(s, str):
        raise TypeError(f"normalize_answer expects a str, got {type(s).__name__}")
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _as_references(references) -> list[str]:
    """Validate `references` and return it as a list of str (a bare str is one reference)."""
    if isinstance(references, str):
        return [references]
    refs = list(references)
    if not refs:
        raise ValueError("at least one reference answer is required, got an empty list")
    for r in refs:
        if not isinstance(r, str):
            raise TypeError(f"reference answers must be str, got {type(r).__name__}: {r!r}")
    return refs


def _check_prediction(prediction) -> str:
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}: {prediction!r}")
    return prediction


def _token_f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(prediction_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references) -> float:
    """Official SQuAD v1.1 exact match: max over `references` of normalized equality (1.0/0.0).

    `references` is a non-empty list of str (a bare str counts as one reference).
    Raises ValueError for an empty reference list and TypeError for non-str inputs.
    """
    norm_pred = normalize_answer(_check_prediction(prediction))
    return float(any(norm_pred == normalize_answer(r) for r in _as_references(references)))


def f1(prediction: str, references) -> float:
    """Official SQuAD v1.1 token F1 in [0, 1], max over `references`."""
    pred_tokens = normalize_answer(_check_prediction(prediction)).split()
    return max(_token_f1(pred_tokens, normalize_answer(r).split()) for r in _as_references(references))


def shortest_reference(references) -> str:
    """The gold answer of the MBC/MAC/CaMeLS reference code: `min(references, key=len)`.

    Shortest by raw character length, the first one on ties.
    """
    return min(_as_references(references), key=len)


def prefix_exact_match(prediction: str, references) -> float:
    """MBC/MAC reference-code EM (1.0/0.0): prefix match against the shortest reference.

    `gold = normalize_answer(shortest_reference(references))`; returns 1.0 iff
    `normalize_answer(prediction)[:len(gold)] == gold`. Not the official SQuAD EM.
    """
    gold = normalize_answer(shortest_reference(references))
    norm_pred = normalize_answer(_check_prediction(prediction))
    return float(norm_pred[: len(gold)] == gold)


def squad_scores(predictions, references) -> dict:
    """Corpus scores: mean per-question `exact_match`, `f1`, `prefix_exact_match` in percent.

    `predictions` is a list of str, `references` a list (same length) of lists of str.
    Returns `{"exact_match": float, "f1": float, "prefix_exact_match": float, "n": int}`
    with the three scores in [0, 100]. Raises ValueError when the lengths differ or the
    input is empty, and for an empty reference list.
    """
    predictions = list(predictions)
    references = list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists"
        )
    if not predictions:
        raise ValueError("no predictions to score")
    em_sum = f1_sum = pem_sum = 0.0
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        try:
            em_sum += exact_match(pred, refs)
            f1_sum += f1(pred, refs)
            pem_sum += prefix_exact_match(pred, refs)
        except (TypeError, ValueError) as e:
            raise type(e)(f"example {i}: {e}") from None
    n = len(predictions)
    return {
        "exact_match": 100.0 * em_sum / n,
        "f1": 100.0 * f1_sum / n,
        "prefix_exact_match": 100.0 * pem_sum / n,
        "n": n,
    }


_CITATION = """\
@inproceedings{rajpurkar-etal-2016-squad,
  title = {{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text},
  author = {Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle = {Proceedings of EMNLP},
  year = {2016}
}
"""

_DESCRIPTION = """\
SQuAD v1.1 exact match and token F1 (max over references), plus the prefix exact match
of the MBC / MAC reference code (normalized prediction cut to the length of the
normalized shortest reference). Works offline.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one generated answer per question.
    references: list of lists of str, all reference answers of each question.
Returns:
    exact_match: official SQuAD EM, percent (0-100).
    f1: official SQuAD token F1, percent (0-100).
    prefix_exact_match: MBC/MAC reference-code EM, percent (0-100).
    n: number of scored questions.
Examples:
    >>> m = mbc_hf.metrics.load_metric()
    >>> m.compute(predictions=["the Eiffel Tower, Paris"], references=[["Eiffel Tower"]])
    {'exact_match': 0.0, 'f1': 80.0, 'prefix_exact_match': 100.0, 'n': 1}
"""


def _define_metric_class():
    """Create the `evaluate.Metric` subclass (importing `evaluate` costs seconds, so lazily)."""
    import datasets
    import evaluate

    class MbcSquad(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description=_DESCRIPTION,
                citation=_CITATION,
                inputs_description=_KWARGS_DESCRIPTION,
                features=datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
            )

        def _compute(self, predictions, references):
            return squad_scores(predictions, references)

    MbcSquad.__qualname__ = "MbcSquad"
    MbcSquad.__doc__ = "`evaluate` wrapper around `squad_scores`.\n" + _DESCRIPTION + _KWARGS_DESCRIPTION
    return MbcSquad


# `evaluate.load` imports its cached copy of this file (with `evaluate` already imported)
# and looks for the Metric subclass in the module namespace, so define it eagerly then.
# Imported as `mbc_hf.metrics.mbc_squad.mbc_squad` the plain functions stay cheap and
# `MbcSquad` is created on first attribute access.
if "evaluate" in sys.modules:
    MbcSquad = _define_metric_class()
else:

    def __getattr__(name):
        if name == "MbcSquad":
            cls = _define_metric_class()
            globals()["MbcSquad"] = cls
            return cls
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

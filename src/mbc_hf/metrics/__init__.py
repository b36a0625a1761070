"""Answer scoring for MBC evaluation (SQuAD EM/F1 and the MBC/MAC prefix EM).

The scoring code lives once, in the standalone `evaluate` metric module
`mbc_hf/metrics/mbc_squad/mbc_squad.py`; this package re-exports its plain functions
and offers `load_metric()` for the `evaluate` interface. See that module's docstring
for the exact definitions.

Public API:

* `normalize_answer(s) -> str`
* `exact_match(prediction, references) -> float`        official SQuAD v1.1 EM, 0/1
* `f1(prediction, references) -> float`                 official SQuAD v1.1 token F1, [0, 1]
* `prefix_exact_match(prediction, references) -> float` MBC/MAC reference-code EM, 0/1
* `shortest_reference(references) -> str`               the reference code's gold answer
* `squad_scores(predictions, references) -> dict`       percentages + `n`
* `load_metric(**kwargs) -> evaluate.EvaluationModule`  the offline `evaluate` metric
"""

from __future__ import annotations

from pathlib import Path

from .mbc_squad.mbc_squad import (
    exact_match,
    f1,
    normalize_answer,
    prefix_exact_match,
    shortest_reference,
    squad_scores,
)

__all__ = [
    "METRIC_DIR",
    "exact_match",
    "f1",
    "load_metric",
    "normalize_answer",
    "prefix_exact_match",
    "shortest_reference",
    "squad_scores",
]

#: Directory of the packaged `evaluate` metric (pass it to `evaluate.load` yourself if you like).
METRIC_DIR = Path(__file__).resolve().parent / "mbc_squad"


def load_metric(**kwargs):
    """Load the packaged metric with `evaluate.load(str(METRIC_DIR), **kwargs)`.

    Works fully offline (`HF_EVALUATE_OFFLINE=1 HF_HUB_OFFLINE=1`): the script is read
    from the installed package, never from the Hub. `kwargs` are passed on to
    `evaluate.load` (e.g. `experiment_id`, `keep_in_memory`, `num_process`/`process_id`).

    `compute(predictions=list[str], references=list[list[str]])` returns the same dict
    as `squad_scores`: `exact_match`, `f1`, `prefix_exact_match` (percent) and `n`.
    """
    import evaluate

    return evaluate.load(str(METRIC_DIR), **kwargs)

"""Decathlon score, Emax and the parameter-overhead formulas."""
import numpy as np
import pytest

from npmask.metrics import (DECATHLON_FINETUNE_ACCURACY, accuracy, decathlon_emax, decathlon_score,
                            emax_from_accuracies, emax_from_errors, score_per_parameter, top1_errors)


def test_emax_is_twice_the_finetune_error():
    emax = decathlon_emax()
    assert set(emax) == set(DECATHLON_FINETUNE_ACCURACY) and len(emax) == 10
    assert emax["imagenet12"] == pytest.approx(2 * (1 - 0.5987))
    assert emax["svhn"] == pytest.approx(2 * 0.0345)
    assert emax_from_errors({"a": 0.25}) == {"a": 0.5}
    assert emax_from_accuracies({"a": 0.75}) == {"a": 0.5}
    with pytest.raises(ValueError, match="fraction"):
        emax_from_errors({"a": 25.0})


def test_score_baseline_perfect_and_worse():
    emax = decathlon_emax()
    baseline = {d: e / 2 for d, e in emax.items()}
    s, per = decathlon_score(baseline, emax)
    assert s == pytest.approx(2500) and all(v == pytest.approx(250) for v in per.values())
    assert decathlon_score({d: 0.0 for d in emax}, emax)[0] == pytest.approx(10000)
    assert decathlon_score({"dtd": emax["dtd"] * 1.5}, emax)[0] == 0.0
    # a quarter of the way from Emax to 0: 1000 * 0.25^2
    assert decathlon_score({"dtd": emax["dtd"] * 0.75}, emax)[0] == pytest.approx(62.5)
    with pytest.raises(KeyError, match="no Emax"):
        decathlon_score({"mnist": 0.1}, emax)


def test_paper_table_4_finetune_row_scores_2500_and_sp_250():
    emax = decathlon_emax()
    errors = {d: 1 - a / 100 for d, a in DECATHLON_FINETUNE_ACCURACY.items()}
    s, _ = decathlon_score(errors, emax)
    assert s == pytest.approx(2500)
    assert score_per_parameter(s, 10) == pytest.approx(250)


def test_accuracy_and_errors():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    labels = np.array([0, 1, 1])
    assert accuracy(logits, labels) == pytest.approx(2 / 3)
    assert top1_errors({"a": logits}, {"a": labels})["a"] == pytest.approx(1 / 3)

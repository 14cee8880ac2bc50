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


def test_a_domain_with_a_perfect_baseline_cannot_be_scored():
    """Emax = 0 (the baseline made no error): alpha = 1000 / Emax^2 is undefined, a clear error."""
    with pytest.raises(ValueError, match="undefined"):
        decathlon_score({"a": 0.1}, {"a": 0.0})


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


# Table 4 of the paper: accuracies (%) as printed (one decimal) and the published S.
TABLE4_DOMAINS = ["imagenet12", "aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb",
                  "vgg-flowers", "omniglot", "svhn", "ucf101"]
TABLE4 = {
    "Finetune": ([59.9, 60.3, 82.1, 92.8, 55.5, 97.5, 81.4, 87.7, 96.6, 51.2], 2500),
    "PB ours": ([60.8, 52.3, 80.0, 95.1, 59.6, 98.7, 82.9, 85.1, 96.7, 46.9], 2805),
    "Ours (S)": ([60.8, 51.3, 81.9, 94.7, 59.0, 99.1, 88.0, 89.3, 96.5, 48.7], 3263),
    "Ours (F)": ([60.8, 52.8, 82.0, 96.2, 58.7, 99.2, 88.2, 89.2, 96.8, 48.6], 3497),
}


@pytest.mark.parametrize("row", list(TABLE4))
def test_table_4_rows_give_the_published_score_within_rounding(row):
    """Every accuracy of table 4 is rounded to 0.1 points, so the exact S lies between the scores
    of all accuracies 0.05 lower and all 0.05 higher (S rises with accuracy); the published S
    (an integer) must fall there. The sum runs over all ten domains, ImageNet included."""
    acc, published = TABLE4[row]
    emax = decathlon_emax()

    def s(shift):
        return decathlon_score({d: 1 - (a + shift) / 100 for d, a in zip(TABLE4_DOMAINS, acc)}, emax)[0]

    lo, mid, hi = s(-0.05), s(0.0), s(0.05)
    assert lo - 0.5 <= published <= hi + 0.5, (row, lo, mid, hi)
    assert abs(mid - published) < 0.01 * published          # and close to the printed figures
    # without ImageNet the sum misses one domain's worth of points and leaves the band
    acc9 = {d: 1 - a / 100 for d, a in zip(TABLE4_DOMAINS[1:], acc[1:])}
    assert decathlon_score(acc9, emax)[0] < lo - 200

"""Accuracy, the Visual Decathlon score, and the parameter overhead computed from stored domain files.

Decathlon score (eq. 3 of the paper), errors E_d as fractions in [0, 1]::

    Emax_d = 2 * (error of the fine-tuning baseline on d)
    S      = Σ_d α_d * max(0, Emax_d - E_d)^2,     α_d = 1000 / Emax_d^2

so a perfect domain gives 1000 and the fine-tuning baseline itself 250 per domain.

Parameter overhead (footnote 3 of the paper), classifiers excluded::

    # Params = 1 + Σ_{domains d != pretraining} A_d / (32 * N_p)     (= 1 + A_p (T-1) / (32 N_p))
    S_p      = S / # Params

with A_d the bits domain d adds (counted from its .npz: 1 bit per mask entry as stored, 32 bits per
stored float32 value) and N_p the backbone's parameters. What the paper counts: masks, k's and the
domain's batch-norm weights and biases (WRN-28-4 ``full``, T = 10: 1.29 as table 4). The BN running
statistics (running_mean, running_var) are stored too, because inference needs them, but the paper
does not count them; :func:`domain_file_bits` reports them apart as ``running_stat_bits`` and
:func:`running_stats_share` gives what they would add to ``# Params``.

The S-score sums over every domain of the model, the pretraining one included (tables 1-4): a
``finetune`` run over the pretraining domain and N targets scores exactly 250 (N + 1).
"""
from __future__ import annotations

import os

from .nn.loss import accuracy  # noqa: F401  (re-exported: one accuracy for the whole package)
from .storage import read_domain_file

# Test accuracy (%) of the fine-tuning baseline of Rebuffi et al. (table 4, "Finetune"); Emax = 2 x error.
DECATHLON_FINETUNE_ACCURACY = {
    "imagenet12": 59.87, "aircraft": 60.34, "cifar100": 82.12, "daimlerpedcls": 92.82, "dtd": 55.53,
    "gtsrb": 97.53, "vgg-flowers": 81.41, "omniglot": 87.69, "svhn": 96.55, "ucf101": 51.20,
}


def emax_from_errors(finetune_errors: dict) -> dict:
    """Emax_d = 2 * E_d(finetune) for errors given as fractions in [0, 1]."""
    out = {}
    for d, e in finetune_errors.items():
        e = float(e)
        if not 0.0 <= e <= 1.0:
            raise ValueError(f"error of domain {d!r} must be a fraction in [0, 1], got {e}")
        out[d] = 2.0 * e
    return out


def emax_from_accuracies(finetune_accuracies: dict, percent: bool = False) -> dict:
    """Emax_d = 2 * (1 - accuracy_d); accuracies as fractions, or percentages with ``percent=True``."""
    scale = 100.0 if percent else 1.0
    return emax_from_errors({d: 1.0 - float(a) / scale for d, a in finetune_accuracies.items()})


def decathlon_emax() -> dict:
    """Emax of the ten Decathlon domains from the published fine-tuning accuracies (fractions)."""
    return emax_from_accuracies(DECATHLON_FINETUNE_ACCURACY, percent=True)


def decathlon_score(errors: dict, emax: dict) -> tuple[float, dict]:
    """``(S, {domain: score_d})`` for test errors (fractions) of the domains in ``errors``.

    Each domain needs an Emax; a domain with Emax = 0 (a perfect baseline) cannot be scored.
    """
    missing = [d for d in errors if d not in emax]
    if missing:
        raise KeyError(f"no Emax for domains {missing}; Emax is known for {sorted(emax)}")
    per = {}
    for d, e in errors.items():
        m = float(emax[d])
        if m <= 0:
            raise ValueError(f"Emax of domain {d!r} is {m}: the score is undefined when the baseline error is 0")
        per[d] = 1000.0 / m ** 2 * max(0.0, m - float(e)) ** 2
    return float(sum(per.values())), per


# ---------------------------------------------------------------------------------- overhead
def domain_file_bits(path) -> dict:
    """What one domain file adds, in bits, from its stored arrays (classifier and real masks excluded).

    Returns ``{"mask_bits", "param_bits", "running_stat_bits", "bits", "backbone_parameters",
    "bits_per_parameter", "variant", "domain"}``; ``bits = mask_bits + param_bits`` is A_d as the
    paper counts it (masks, k's, BN weights and biases, every weight for ``finetune``);
    ``running_stat_bits`` (BN running mean/var, stored for inference) are not in ``bits``.
    bits_per_parameter = A_d / N_p (just over 1 for mask variants, exactly 32 for ``finetune``).
    """
    meta, arrays = read_domain_file(path)
    mask_bits = sum(8 * a.nbytes for k, a in arrays.items() if k.startswith("mask/"))
    param_bits = sum(8 * a.nbytes for k, a in arrays.items()
                     if k.startswith("param/") and not is_running_statistic(k))
    stat_bits = sum(8 * a.nbytes for k, a in arrays.items()
                    if k.startswith("param/") and is_running_statistic(k))
    n_p = int(meta["backbone_parameters"])
    bits = mask_bits + param_bits
    return {"domain": meta["domain"], "variant": meta["variant"], "mask_bits": int(mask_bits),
            "param_bits": int(param_bits), "running_stat_bits": int(stat_bits), "bits": int(bits),
            "backbone_parameters": n_p, "bits_per_parameter": bits / n_p}


RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def is_running_statistic(key: str) -> bool:
    """True for a stored BN running statistic (not a learned parameter; the paper does not count it)."""
    return key.rsplit(".", 1)[-1] in RUNNING_STATISTICS


def params_ratio(paths) -> float:
    """The paper's ``# Params`` for the pretrained network plus the domains stored in ``paths``.

    1 + Σ_d A_d / (32 N_p); with T-1 equal domains this is 1 + A_p (T-1) / (32 N_p). All files must
    come from the same backbone.
    """
    paths = [os.fspath(p) for p in paths]
    infos = [domain_file_bits(p) for p in paths]
    n_ps = {i["backbone_parameters"] for i in infos}
    if len(n_ps) > 1:
        raise ValueError(f"domain files from backbones of different sizes {sorted(n_ps)}: {paths}")
    return 1.0 + sum(i["bits_per_parameter"] for i in infos) / 32.0


def running_stats_share(paths) -> float:
    """What the stored BN running statistics of ``paths`` would add to ``# Params`` (not counted there).

    Σ_d R_d / (32 N_p) with R_d the running-statistic bits of domain d.
    """
    infos = [domain_file_bits(os.fspath(p)) for p in paths]
    return sum(i["running_stat_bits"] / i["backbone_parameters"] for i in infos) / 32.0


def score_per_parameter(score: float, ratio: float) -> float:
    """S_p = S / # Params."""
    if ratio <= 0:
        raise ValueError(f"# Params must be positive, got {ratio}")
    return float(score) / float(ratio)


def top1_errors(logits_by_domain: dict, labels_by_domain: dict) -> dict:
    """``{domain: 1 - accuracy}`` from logits and integer labels per domain."""
    return {d: 1.0 - accuracy(logits_by_domain[d], labels_by_domain[d]) for d in logits_by_domain}

"""npmask.train with its domains trained side by side, one process each: the numbers and files of
the domains trained one after the other."""
from __future__ import annotations

import json

import numpy as np
import pytest

from npmask import train
from test_train import base_args, comparable_metrics, domain_arrays, write_random_backbone, write_tiny_benchmark


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_workers")
    return {"data": write_tiny_benchmark(root / "data"), "tmp": root,
            "backbone": write_random_backbone(root / "backbone.npz")}


def _key(record):
    return record["domain"], record["epoch"]


def test_two_workers_give_the_files_and_numbers_of_one(tiny, capsys):
    one, two = tiny["tmp"] / "one", tiny["tmp"] / "two"
    assert train.main(base_args(tiny, one, "--workers", "1")) == 0
    assert train.main(base_args(tiny, two, "--workers", "2")) == 0
    capsys.readouterr()
    res_one = json.loads((one / "results.json").read_text())
    res_two = json.loads((two / "results.json").read_text())
    for field in ("acc", "params", "score", "sp"):
        assert res_two[field] == res_one[field]
    assert list(res_two["acc"]) == list(res_one["acc"])              # the domains' order too
    for d in ("a", "b"):
        a, b = domain_arrays(one / "domains" / f"{d}.npz"), domain_arrays(two / "domains" / f"{d}.npz")
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(b[k], a[k])
        assert not (two / "checkpoints" / f"{d}.npz").exists()
    assert sorted(comparable_metrics(two), key=_key) == sorted(comparable_metrics(one), key=_key)
    done_one = json.loads((one / "progress.json").read_text())["done"]
    done_two = json.loads((two / "progress.json").read_text())["done"]
    assert done_two.keys() == done_one.keys() == {"a", "b"}
    for d in done_one:
        assert done_two[d]["test_acc"] == done_one[d]["test_acc"]
        assert done_two[d]["epochs"] == done_one[d]["epochs"]
    plots = sorted(p.name for p in (one / "plots").iterdir())
    assert "masks_and_ks.png" in plots                 # drawn from the parent's model, domains loaded
    assert sorted(p.name for p in (two / "plots").iterdir()) == plots


def test_workers_default_and_environment(monkeypatch):
    class Cfg:
        backend = "numpy"
    monkeypatch.setenv("NPMASK_TRAIN_WORKERS", "3")
    assert train.domain_workers(Cfg, None) == 3
    assert train.domain_workers(Cfg, 2) == 2
    monkeypatch.delenv("NPMASK_TRAIN_WORKERS")
    assert train.domain_workers(Cfg, None) == train.settings.threads
    Cfg.backend = "cupy"
    assert train.domain_workers(Cfg, None) == 1
    monkeypatch.setenv("NPMASK_TRAIN_WORKERS", "0")
    with pytest.raises(train.ConfigError, match="NPMASK_TRAIN_WORKERS"):
        train.domain_workers(Cfg, None)


def test_a_worker_takes_the_parents_settings(monkeypatch, tmp_path):
    from npmask.config import settings, using
    from npmask.training import domain_workers

    class Cfg:
        backend = "numpy"
    monkeypatch.setattr(domain_workers, "load_run_backbone", lambda cfg: (None, None))
    seen = {}

    def fake_train_domain(cfg, folder, model, d, **kw):
        seen.update(settings.as_dict())
        return {}
    chosen = {**settings.as_dict(), "threads": 1, "fuse_bn_relu": not settings.fuse_bn_relu,
              "conv_impl": "readable"}
    with using(**{k: v for k, v in settings.as_dict().items()}):   # restored after the test
        domain_workers._train_one(fake_train_domain, Cfg, str(tmp_path), "a", None, False, chosen)
    assert seen == chosen


def test_the_workers_flag_reaches_the_training(tiny, tmp_path, monkeypatch):
    """--workers N is what train_domains gets, over NPMASK_TRAIN_WORKERS; without the flag the
    variable decides (kills the mutation that drops --workers between main and train_domains,
    which test_two_workers... cannot see: one and two workers give the same numbers)."""
    seen = []

    def fake_train_domains(cfg, folder, **kw):
        seen.append(kw.get("workers"))
        return {"acc": {}, "score": None, "params": None, "sp": None}
    monkeypatch.setattr(train, "train_domains", fake_train_domains)
    monkeypatch.setenv("NPMASK_TRAIN_WORKERS", "5")
    assert train.main(base_args(tiny, tmp_path / "flag", "--workers", "3")) == 0
    assert train.main(base_args(tiny, tmp_path / "env")) == 0
    assert seen == [3, 5]

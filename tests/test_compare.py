"""python -m npmask.compare on a tiny benchmark: the table's rows, scores and parameter counts."""
from __future__ import annotations

import json

import pytest

from npmask import compare
from test_train import write_random_backbone, write_tiny_benchmark


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    return {"data": write_tiny_benchmark(root / "data"),
            "backbone": write_random_backbone(root / "backbone.npz"), "tmp": root}


def args(tiny, out, *extra):
    return ["--benchmark", "folder", "--data-root", str(tiny["data"]), "--domains", "a,b",
            "--model", "wrn10_1", "--input-size", "16", "--backbone", str(tiny["backbone"]),
            "--epochs", "1", "--batch-size", "16", "--lr-body", "1e-3", "--lr-head", "1e-2",
            "--variants", "classifier_only,finetune,piggyback,full", "--out", str(out), "--quiet",
            *extra]


def test_compare_writes_the_table_with_scores_from_the_finetune_row(tiny, tmp_path, capsys):
    out, table = tmp_path / "cmp", tmp_path / "table.md"
    assert compare.main(args(tiny, out, "--table", str(table))) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["classifier_only", "finetune", "piggyback", "full"]  # the order asked for
    # by definition of Emax = 2 x the finetune error, the finetune row scores 250 per domain
    assert rows["finetune"]["score"] == pytest.approx(250.0 * 2)
    # finetune stores every weight (32 bits each) per domain, mask variants ~1 bit, classifier_only 0
    assert rows["classifier_only"]["params"] == pytest.approx(1.0)
    assert 2.9 < rows["finetune"]["params"] < 3.2
    for v in ("piggyback", "full"):
        assert 1.0 < rows[v]["params"] < 1.2
    assert rows["piggyback"]["params"] < rows["full"]["params"]  # full also stores domain BN and k's
    for r in rows.values():
        assert r["sp"] == pytest.approx(r["score"] / r["params"])
        assert set(r["acc"]) == {"a", "b"}
    text = table.read_text()
    assert text == (out / "results.md").read_text()
    assert "| Method | a | b | S-score | # Params | S_p |" in text
    assert "python -m npmask.compare --benchmark folder" in text  # the command that produced it
    for v in rows:
        assert (out / v / "results.json").is_file() and (out / v / "domains" / "a.npz").is_file()
    assert "finetune" in capsys.readouterr().out


def test_compare_resume_finishes_an_interrupted_comparison(tiny, tmp_path):
    out = tmp_path / "cmp"
    a = args(tiny, out)
    a[a.index("--variants") + 1] = "finetune,full"
    assert compare.main(a + ["--stop-after-epochs", "3"]) == 0  # finetune (2 domains), then 1 of full
    assert not (out / "results.json").exists()
    assert compare.main(["--resume", "--out", str(out), "--quiet"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["finetune", "full"]
    ref = tmp_path / "ref"  # the same comparison, uninterrupted: identical numbers
    b = args(tiny, ref)
    b[b.index("--variants") + 1] = "finetune,full"
    assert compare.main(b) == 0
    assert rows == json.loads((ref / "results.json").read_text())["rows"]


def test_compare_rejects_unknown_variants(tiny, tmp_path):
    a = args(tiny, tmp_path / "x")
    a[a.index("--variants") + 1] = "full,magic"
    with pytest.raises(SystemExit) as e:
        compare.main(a)
    assert "unknown variant 'magic'" in str(e.value.code)

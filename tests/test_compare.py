"""python -m npmask.compare on a tiny benchmark: the table's rows, scores and parameter counts."""
from __future__ import annotations

import json
import re

import pytest

from npmask import compare
from npmask.training.results import markdown_table, mean_std_row, text_table
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
    # by definition of Emax = 2 x the finetune error, the finetune row scores 250 per domain, the
    # pretraining domain included (eq. 3 sums over every domain, as tables 1-4): 250 (N + 1)
    assert rows["finetune"]["score"] == pytest.approx(250.0 * 3)
    assert rows["finetune"]["score_per_domain"]["base"] == pytest.approx(250.0)
    base_acc = {r["acc"]["base"] for r in rows.values()}
    assert len(base_acc) == 1   # the backbone's own accuracy, the same in every row
    # finetune stores every weight (32 bits each) per domain, mask variants ~1 bit, classifier_only 0
    assert rows["classifier_only"]["params"] == pytest.approx(1.0)
    assert 2.9 < rows["finetune"]["params"] < 3.2
    for v in ("piggyback", "full"):
        assert 1.0 < rows[v]["params"] < 1.2
    assert rows["piggyback"]["params"] < rows["full"]["params"]  # full also stores domain BN and k's
    for r in rows.values():
        assert r["sp"] == pytest.approx(r["score"] / r["params"])
        assert list(r["acc"]) == ["base", "a", "b"]
    text = table.read_text()
    assert text == (out / "results.md").read_text()
    assert "| Method | base | a | b | S-score | # Params | S_p |" in text
    assert "python -m npmask.compare --benchmark folder" in text  # the command that produced it
    best_first = sorted(rows.values(), key=lambda r: -r["score"])
    assert "S-score ranking: " + "; ".join(f"{r['method']} {round(r['score'])}" for r in best_first) in text
    for v in rows:
        for d in ("a", "b"):  # one run folder per (variant, domain) job
            assert (out / v / d / "results.json").is_file()
            assert (out / v / d / "domains" / f"{d}.npz").is_file()
    assert "finetune" in capsys.readouterr().out


def test_table_cells_round_as_the_paper_and_say_n_a_for_what_is_missing():
    """Accuracies to 0.1, S-scores to 1, # Params to 0.001; None and NaN read "n/a", with no ± after."""
    nan = float("nan")
    rows = [{"method": "full", "acc": {"a": 91.26, "b": nan}, "acc_std": {"a": 0.44, "b": nan},
             "score": 1234.56, "params": 1.02345, "sp": None, "sp_std": 3.0}]
    assert markdown_table(rows, ["a", "b"]).splitlines()[2] == \
        "| full | 91.3 ± 0.4 | n/a | 1235 | 1.023 | n/a |"


def test_the_terminal_table_right_aligns_the_numbers():
    rows = [{"method": "classifier_only", "acc": {"a": 5.0}, "score": 12.0, "params": 1.0, "sp": 12.0},
            {"method": "full", "acc": {"a": 100.0}, "score": 1500.0, "params": 1.02, "sp": 1470.6}]
    head, rule, *lines = text_table(rows, ["a"]).splitlines()
    columns = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]   # the rule under each head
    cells = [[line[a:b] for a, b in columns] for line in lines]
    assert [c.strip() for c in cells[1]] == ["full", "100.0", "1500", "1.020", "1471"]
    for row in cells:   # the method flush left, every number flush right
        assert not row[0].startswith(" ") and not any(c.endswith(" ") for c in row[1:])


def test_a_mean_over_seeds_has_no_cell_where_a_seed_has_none_and_keeps_its_failures():
    runs = [{"acc": {"a": 90.0, "b": 70.0}, "score": 800.0, "params": 1.1, "sp": 727.0},
            {"acc": {"a": 80.0, "b": None}, "score": None, "params": None, "sp": None,
             "failed": {"b": "disk full"}}]
    row = mean_std_row("full", runs)
    assert row["acc"] == {"a": 85.0, "b": None} and row["acc_std"]["b"] is None
    assert row["score"] is None and row["params"] is None and row["sp"] is None
    assert row["failed"] == {"b": "disk full"} and row["runs"] == 2


def test_compare_resume_finishes_an_interrupted_comparison(tiny, tmp_path):
    out = tmp_path / "cmp"
    a = args(tiny, out)
    a[a.index("--variants") + 1] = "finetune,full"
    assert compare.main(a + ["--stop-after-epochs", "3"]) == 0  # finetune (2 domains), then 1 of full
    assert not (out / "results.json").exists()
    for other, says in ((["--variants", "full"], "--variants differs from the comparison's"),
                        (["--seeds", "0,1"], "--seeds differs from the comparison's")):
        with pytest.raises(SystemExit) as e:          # a continued comparison keeps its rows
            compare.main(["--resume", "--out", str(out), "--quiet", *other])
        assert says in str(e.value.code)
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


def test_compare_over_seeds_reports_mean_and_std_and_keeps_every_run(tiny, tmp_path):
    out = tmp_path / "cmp"
    a = args(tiny, out, "--seeds", "0,1")
    a[a.index("--variants") + 1] = "finetune,full"
    assert compare.main(a) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and len(res["runs"]) == 4       # every (variant, seed) kept
    runs = {(r["method"], r["seed"]): r for r in res["runs"]}
    for seed in (0, 1):
        # each seed is scored with its own finetune row: exactly 250 (N + 1)
        assert runs[("finetune", seed)]["score"] == pytest.approx(750.0)
        assert (out / f"seed{seed}" / "full" / "a" / "domains" / "a.npz").is_file()
        cfg = json.loads((out / f"seed{seed}" / "full" / "b" / "config.json").read_text())["config"]
        assert cfg["domains"] == ["b"]
        assert cfg["seed"] == seed
    assert runs[("full", 0)]["acc"] != runs[("full", 1)]["acc"]      # the seed changes the run
    rows = {r["method"]: r for r in res["rows"]}
    full = [runs[("full", s)] for s in (0, 1)]
    assert rows["full"]["acc"]["a"] == pytest.approx((full[0]["acc"]["a"] + full[1]["acc"]["a"]) / 2)
    sd = abs(full[0]["acc"]["a"] - full[1]["acc"]["a"]) / 2 ** 0.5      # sample std of two runs
    assert rows["full"]["acc_std"]["a"] == pytest.approx(sd)
    assert rows["full"]["score"] == pytest.approx((full[0]["score"] + full[1]["score"]) / 2)
    text = (out / "results.md").read_text()
    assert f"| full | {rows['full']['acc']['base']:.1f} ± 0.0 |" in text
    assert f"{rows['full']['acc']['a']:.1f} ± {sd:.1f}" in text
    assert "mean ± sample std over 2 runs" in text


def test_compare_rejects_seed_and_seeds_together(tiny, tmp_path):
    with pytest.raises(SystemExit) as e:
        compare.main(args(tiny, tmp_path / "x", "--seeds", "0,1", "--seed", "3"))
    assert "either --seed or --seeds" in str(e.value.code)


def test_bad_seeds_and_table_are_one_line_before_any_folder(tiny, tmp_path):
    (tmp_path / "tables").mkdir()
    for extra, says in ((["--seeds", "0,-1"], "--seeds must be >= 0, got [0, -1]"),
                        (["--variants", "full,piggyback,full"], "--variants lists a variant twice"),
                        (["--table", str(tmp_path / "tables")], "is a folder; give the path of")):
        with pytest.raises(SystemExit) as e:
            compare.main(args(tiny, tmp_path / "x", *extra))
        msg = str(e.value.code)
        assert msg.startswith("python -m npmask.compare: error: ") and says in msg
        assert "\n" not in msg
        assert not (tmp_path / "x").exists()

"""`jaxpost sweep`: points run in their own workdirs, reruns skip finished points, a summary."""

import csv

from conftest import REPO

from jaxpost import sweep
from jaxpost.main import main

ARGS = [
    f"--config={REPO}/configs/sft.py:smoke",
    "--config.train.num_steps=2",
    "--config.eval.every_steps=1",
    "--config.data.max_eval_examples=8",
    "--config.log.tensorboard=false",
]


def test_a_two_point_sweep_runs_summarises_and_skips_finished_points(tmp_path, capsys, caplog):
    root = tmp_path / "sweep"
    result = main(["sweep", f"--root={root}", *ARGS])
    points = result["points"]
    assert [p.name for p in points] == ["lr=0.001", "lr=0.003"]
    assert all(p.status == "done" for p in points)
    for p in points:  # eval before training and after each of the 2 steps
        assert [s for s, _ in p.curves["eval/loss"]] == [0, 1, 2]
        assert p.eval["eval/loss"] == p.curves["eval/loss"][-1][1]
    winner = min(points, key=lambda p: p.eval["eval/loss"])
    rows = list(csv.DictReader(open(result["csv"])))
    assert [r["point"] for r in rows] == ["lr=0.001", "lr=0.003"]
    assert [r["best"] for r in rows] == ["yes" if p is winner else "" for p in points]
    assert float(rows[0]["eval/loss"]) == points[0].eval["eval/loss"]
    md = (root / "summary.md").read_text()
    assert f"**{winner.name}**" in md and "| optim.lr |" in md
    assert (root / "eval_curves.png").stat().st_size > 5_000
    assert f"Best by eval/loss (min): **{winner.name}**" in capsys.readouterr().out

    caplog.set_level("INFO", logger="jaxpost")
    again = main(["sweep", f"--root={root}", *ARGS])  # finished points are not run again
    assert "finished, skipped" in caplog.text and "resumed" not in caplog.text
    assert [p.eval for p in again["points"]] == [p.eval for p in points]


def test_dry_run_prints_each_points_command(tmp_path, capsys):
    main(["sweep", f"--root={tmp_path}", "--dry_run", "--launch=run-job {name} --", *ARGS])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("run-job lr=0.003 -- train ")
    assert f"--workdir={tmp_path}/lr=0.003" in lines[1] and "--config.optim.lr=0.003" in lines[1]
    assert not (tmp_path / "lr=0.001").exists()
    assert sweep.point_name({"a.b": 1, "c": "x/y"}) == "b=1_c=x-y"


def test_a_failed_point_is_recorded_and_only_finished_points_can_be_best(tmp_path):
    config = tmp_path / "broken.py"
    sft = str(REPO / "configs" / "sft.py")
    config.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('sft', {sft!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "get_config = module.get_config\n"
        "def get_sweep(arg=None):\n"
        "    return [{'data.train_path': '/nonexistent/train.jsonl'}]\n"
    )
    result = main(["sweep", f"--root={tmp_path / 'r'}", f"--config={config}:smoke", *ARGS[1:]])
    (point,) = result["points"]
    assert point.status == "failed" and "No data file matches" in point.error
    assert "No finished point has a finite eval/loss" in (tmp_path / "r" / "summary.md").read_text()

    done = sweep.Point("a", {}, "", [], 2, status="done", eval={"eval/loss": 2.0})
    cut = sweep.Point("b", {}, "", [], 2, status="incomplete", eval={"eval/loss": 1.0})
    assert sweep.best([done, cut], "eval/loss", "min") is done
    assert sweep.best([done, cut], "eval/loss", "max") is done

"""The benchmark runner's table is computed from the runs' metrics.json files."""

import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest

from clusterlab.benchmark import main, run_stage
from tests.helpers import TINY_CC


def test_runner_writes_the_table_from_the_runs_metrics(in_tmp):
    (in_tmp / "tiny_cc.yaml").write_text(TINY_CC)
    (in_tmp / "suite.yaml").write_text(
        "key: tiny\ntitle: Tiny suite\nmethods:\n  - name: CC\n"
        "    stages: [{config: tiny_cc.yaml, args: ['--figures.enabled', 'true']}]\n"
        "  - name: CC again\n    stages: [tiny_cc.yaml]\n"  # the same config and seeds, at the same time
        "  - name: unused\n    stages: [missing.yaml]\n"
        "args: ['--trainer.max_epochs', '1', '--kmeans_baseline', 'true']\n"
        "anchors:\n  - {name: k-means, acc: 0.47, nmi: 0.51}\n"
    )
    (in_tmp / "results.md").write_text("# Results\n\nkept text\n")
    record = main(
        ["suite.yaml", "--seeds", "0", "1", "--results", "results.md", "--json_dir", "out", "--jobs", "4"]
        + ["--methods", "CC", "CC again"]
    )

    runs = record["runs"]["CC"]
    metrics = [json.loads((in_tmp / r["run_dir"] / "metrics.json").read_text()) for r in runs]
    assert [m["seed"] for m in metrics] == [0, 1] and set(record["runs"]) == {"CC", "CC again"}
    # Runs of one config and seed at the same time land in their own directories, each found.
    again = [r["run_dir"] for r in record["runs"]["CC again"]]
    assert len({r["run_dir"] for r in runs} | set(again)) == 4
    # The stage's own args (the tiny config draws no figures)
    assert all((in_tmp / r["run_dir"] / "figures").is_dir() for r in runs)
    assert not any((in_tmp / run_dir / "figures").exists() for run_dir in again)
    # Four runs at a time (CC and "CC again" of a seed start together), each on its share of the cores.
    assert {m["environment"]["threads"] for m in metrics} == {max(1, (os.cpu_count() or 1) // 4)}
    text = (in_tmp / "results.md").read_text()
    assert text.startswith("# Results\n\nkept text\n") and "<!-- benchmark:tiny -->" in text
    for name, key in (("CC", None), ("k-means (pixels)", "kmeans")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        # NMI, ACC, ARI, then AMI and many-to-one ACC (recorded by every run here)
        for column, metric in zip(row.split("|")[2:7], ("nmi", "acc", "ari", "ami", "many_to_one_acc")):
            values = [m[metric] if key is None else m[key][metric] for m in metrics]
            mean, std = (float(x) for x in column.split("+-"))
            assert mean == pytest.approx(statistics.mean(values), abs=1e-4)
            assert std == pytest.approx(statistics.stdev(values), abs=1e-4)
        accs = [m["acc"] if key is None else m[key]["acc"] for m in metrics]
        low, seed = row.split("|")[7].split()
        assert float(low) == pytest.approx(min(accs), abs=1e-4) and int(seed.strip("()")) == accs.index(
            min(accs)
        )
    assert "| k-means (published) | 0.510 | 0.470 | - | - | - | | | |" in text
    assert "| method | NMI | ACC | ARI | AMI | ACC many-to-one | worst ACC (seed) |" in text
    assert "python -m clusterlab.benchmark suite.yaml --seeds 0 1" in text

    # --resume takes the finished runs from the progress file: no new run directories.
    run_dirs = sorted(p.parent for p in in_tmp.glob("runs/**/metrics.json"))
    resumed = main(
        ["suite.yaml", "--seeds", "0", "1", "--results", "results.md", "--json_dir", "out", "--resume"]
        + ["--methods", "CC"]
    )
    assert [r["run_dir"] for r in resumed["runs"]["CC"]] == [r["run_dir"] for r in runs]
    assert sorted(p.parent for p in in_tmp.glob("runs/**/metrics.json")) == run_dirs

    main(  # replaces its block (seed 0's run taken from the progress file, not run again)
        ["suite.yaml", "--seeds", "0", "--results", "results.md", "--json_dir", "out", "--methods", "CC"]
        + ["--resume"]
    )
    assert (in_tmp / "results.md").read_text().count("<!-- benchmark:tiny -->") == 1
    assert json.loads((in_tmp / "out" / "tiny.json").read_text())["rows"][1]["seeds"] == [0]


@pytest.mark.slow  # 40 s of budgeted runs; the runner's table and resume are tested above in make test
def test_a_stage_takes_its_share_of_the_budget_and_a_changed_config_is_run_again(in_tmp):
    (in_tmp / "tiny_cc.yaml").write_text(TINY_CC)
    (in_tmp / "suite.yaml").write_text(
        "key: shares\ntitle: Shares\nmethods:\n  - name: two stages\n"
        "    stages: [{config: tiny_cc.yaml, budget_share: 0.5},\n"
        "             {config: tiny_cc.yaml, budget_share: 0.25}]\n"
        "args: ['--trainer.max_epochs', '1', '--figures.enabled', 'false']\n"
    )
    argv = ["suite.yaml", "--seeds", "0", "--budget_minutes", "2", "--results", "results.md"]
    argv += ["--json_dir", "out", "--resume"]
    first = main(argv)["runs"]["two stages"][0]
    commands = [json.loads((in_tmp / d / "metrics.json").read_text())["command"] for d in first["stage_runs"]]
    # 2 minutes: 60 s for the first stage, 30 s for the second.
    assert [c.split("--trainer.max_time ")[1].split()[0] for c in commands] == ["00:00:01:00", "00:00:00:30"]

    assert main(argv)["runs"]["two stages"][0]["stage_runs"] == first["stage_runs"]  # resumed
    (in_tmp / "tiny_cc.yaml").write_text(TINY_CC + "# edited\n")  # same name, new contents: run again
    again = main(argv)["runs"]["two stages"][0]["stage_runs"]
    assert not set(again) & set(first["stage_runs"])


def test_the_runner_takes_the_run_directory_from_the_file_the_run_writes(in_tmp, monkeypatch):
    """Not from what the run prints: a line that looks like the report's is not taken."""
    (in_tmp / "runs" / "tiny" / "mine").mkdir(parents=True)
    (in_tmp / "runs" / "tiny" / "mine" / "metrics.json").write_text("{}")

    def fake_run(command, env, **kwargs):
        Path(env["CLUSTERLAB_RUN_DIR_FILE"]).write_text("runs/tiny/mine\n")
        return subprocess.CompletedProcess(command, 0, stdout="Run directory: runs/tiny/other\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert run_stage("tiny.yaml", 0, [], "runs") == Path("runs/tiny/mine")

    monkeypatch.setattr(
        subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 0, "", "")
    )
    with pytest.raises(RuntimeError, match="no metrics.json"):  # a run that never said where it wrote
        run_stage("tiny.yaml", 0, [], "runs")


def test_a_table_of_runs_that_predate_ami_keeps_its_old_columns():
    """Runs recorded before AMI and many-to-one ACC were computed: no column of dashes for them."""
    from clusterlab.benchmark import markdown, summarize

    runs = {
        "CC": [{"seed": s, "nmi": 0.9, "acc": 0.95 + s / 100, "ari": 0.9, "wall_time_s": 1.0} for s in (0, 1)]
    }
    text = markdown({"title": "t"}, summarize(runs), "cmd", "here")
    assert "| method | NMI | ACC | ARI | worst ACC (seed) | fit time per run | seeds |" in text
    assert "| CC | 0.9000 +- 0.0000 | 0.9550 +- 0.0071 | 0.9000 +- 0.0000 | 0.9500 (0) | 1 s | 0, 1 |" in text


def test_resume_takes_a_finished_stage_and_continues_a_killed_one_in_its_directory(in_tmp):
    """A method killed in its second stage: --resume keeps the first stage's run and continues the
    second from its checkpoint, in its own directory (no new run directory)."""
    (in_tmp / "tiny_cc.yaml").write_text(TINY_CC)
    (in_tmp / "suite.yaml").write_text(
        "key: killed\ntitle: Killed\nmethods:\n  - name: two stages\n"
        "    stages: [tiny_cc.yaml, {config: tiny_cc.yaml, args: ['--figures.enabled', 'false']}]\n"
        "args: ['--trainer.max_epochs', '1']\n"
    )
    argv = ["suite.yaml", "--seeds", "0", "--results", "results.md", "--json_dir", "out", "--resume"]
    first, second = main(argv)["runs"]["two stages"][0]["stage_runs"]
    # What a kill in the second stage leaves: the method not recorded as finished, the second stage's
    # run without its metrics.json (written last), its checkpoint kept.
    (in_tmp / "out" / "killed.progress.json").unlink()
    (in_tmp / second / "metrics.json").unlink()
    kept = (in_tmp / first / "metrics.json").stat().st_mtime_ns
    run_dirs = sorted(p.parent for p in in_tmp.glob("runs/**/config.yaml"))

    assert main(argv)["runs"]["two stages"][0]["stage_runs"] == [first, second]
    assert (in_tmp / first / "metrics.json").stat().st_mtime_ns == kept  # taken, not run again
    command = json.loads((in_tmp / second / "metrics.json").read_text())["command"]
    assert f"--ckpt_path {second}/checkpoints/last.ckpt" in command
    assert sorted(p.parent for p in in_tmp.glob("runs/**/config.yaml")) == run_dirs

    # Without --resume both stages run again, in new directories.
    again = main(argv[:-1])["runs"]["two stages"][0]["stage_runs"]
    assert not set(again) & {first, second}

"""clusterlab.cluster.output: --out is replaced whole by a re-run, and a stopped or killed run
leaves no partial folder behind."""

from __future__ import annotations

import json
import os
import shutil

from clusterlab.cli import main
from clusterlab.cluster import output
from tests.cluster.folders import rows, write_photo_folder


def test_a_rerun_into_the_same_out_replaces_the_previous_output_whole(grouped, tmp_path, capsys):
    folder, previous = grouped
    out = tmp_path / "again"
    # (Without the predict-* folders that other tests' `clusterlab predict` wrote into it: a re-run
    # never replaces those, tests/hostile/test_output_folder.py.)
    shutil.copytree(previous, out, ignore=shutil.ignore_patterns("predict-*"))
    # A file that an earlier run wrote (and its marker lists) but this run does not write.
    (out / "leftover.txt").write_text("from an earlier run")
    marker = json.loads((out / output.MARKER).read_text())
    (out / output.MARKER).write_text(json.dumps({**marker, "files": [*marker["files"], "leftover.txt"]}))
    main(
        [
            "cluster",
            str(folder),
            "--out",
            str(out),
            "--num_clusters",
            "3",
            "--epochs",
            "2",
            "--batch_size",
            "40",
        ]
    )
    printed = capsys.readouterr().out
    assert "reused the cache of the previous run" in printed and f"Report: {out / 'report.html'}" in printed
    assert not (out / "leftover.txt").exists()  # nothing of the earlier run is mixed in
    assert json.loads((out / "cluster.json").read_text())["num_clusters"] == 3
    assert {int(r["cluster"]) for r in rows(out / "assignments.csv")} <= {0, 1, 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_a_run_stopped_by_sigterm_leaves_no_partial_output(tmp_path):
    """`kill` (or a scheduler's time limit) in the middle of training: exit 143, the hidden
    partial folder removed, --out not created."""
    import signal
    import subprocess
    import sys
    import time

    photos, out = tmp_path / "photos", tmp_path / "out"
    write_photo_folder(photos, per_kind=10)
    command = [sys.executable, "-m", "clusterlab", "cluster", str(photos), "--out", str(out)]
    process = subprocess.Popen(
        [*command, "--epochs", "300", "--batch_size", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob(".out.partial-*/logs")):
            time.sleep(0.2)  # training has started once the phase writes its logs
        assert list(tmp_path.glob(".out.partial-*/logs")), "the run never reached training"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name], list(tmp_path.iterdir())


def test_partial_folders_of_killed_runs_are_removed_by_the_next_run_and_live_ones_kept(tmp_path):
    """SIGKILL leaves the hidden partial folder; the next run into the same --out removes it,
    never the partial folder of a run still going, and the finished output has no owner file."""
    import socket
    import subprocess
    import sys

    from clusterlab.cluster.output import OWNER, make_staging, swap_in

    out = tmp_path / "out"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    killed, running, foreign = (tmp_path / f".out.partial-{n}" for n in ("killed", "running", "foreign"))
    for partial, owner in ((killed, f"{host} {dead.stdout.strip()}"), (running, f"{host} {os.getpid()}")):
        partial.mkdir()
        (partial / OWNER).write_text(owner)
        (partial / "assignments.csv").write_text("path,cluster,confidence\n")
    foreign.mkdir()  # no owner file: not judged
    staging = make_staging(out)
    assert not killed.exists() and running.exists() and foreign.exists()
    assert (staging / OWNER).read_text().split() == [host, str(os.getpid())]
    swap_in(staging, out)
    assert out.is_dir() and not (out / OWNER).exists()

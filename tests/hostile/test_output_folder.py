"""Nothing clusterlab did not write is deleted or overwritten: the folder command's --out, --runs_dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clusterlab.cli import main
from clusterlab.cluster import command, output
from tests import formats
from tests.helpers import TINY_CC

FAST = ["--epochs", "1", "--minutes", "1", "--num_clusters", "2", "--image_size", "8", "--batch_size", "4"]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and modification time."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as done:
        main(["cluster", *map(str, argv)])
    assert done.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def photos(tmp_path) -> Path:
    formats.write_png_folder(tmp_path / "photos", per_class=4, size=(12, 10))
    return tmp_path / "photos"


@pytest.mark.parametrize("marker_name", [output.MARKER, "cluster.json"])
def test_a_user_folder_with_a_file_of_the_markers_name_is_refused_untouched(
    tmp_path, photos, capsys, marker_name
):
    mine = tmp_path / "mine"
    (mine / "drafts").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "drafts" / "chapter1.tex").write_text("precious")
    (mine / marker_name).write_text('{"my": "settings"}')
    before = snapshot(mine)
    line = one_line(capsys, photos, "--out", mine, *FAST)
    assert line.startswith(f"clusterlab: error: --out {mine} holds {mine}/")
    assert "which `clusterlab cluster` did not write; nothing was changed" in line
    assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "photos"]  # no partial folder left


def test_a_forged_marker_does_not_cover_files_it_does_not_list(tmp_path, photos, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / output.MARKER).write_text(
        json.dumps({"written_by": output.WRITER, "run_id": "x", "files": ["report.html"]})
    )
    before = snapshot(mine)
    assert f"holds {mine / 'notes.txt'}, which" in one_line(capsys, photos, "--out", mine, *FAST)
    assert snapshot(mine) == before


def test_a_file_added_to_the_output_during_the_run_stops_the_swap_and_both_are_kept(
    tmp_path, photos, capsys, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()  # empty: accepted at the start
    real_run = command.run

    def run_while_a_user_writes(*args, **kwargs):
        summary = real_run(*args, **kwargs)
        (out / "todo.txt").write_text("written while the run was going")
        return summary

    monkeypatch.setattr(command, "run", run_while_a_user_writes)
    line = one_line(capsys, photos, "--out", out, *FAST)
    assert f"--out {out} now holds {out / 'todo.txt'}, which `clusterlab cluster` did not write" in line
    assert snapshot(out) == {
        "todo.txt": ((out / "todo.txt").read_bytes(), (out / "todo.txt").stat().st_mtime_ns)
    }
    kept = Path(line.rsplit("This run's output is in ", 1)[1].rstrip("."))
    assert kept.parent == tmp_path and (kept / "report.html").is_file() and (kept / "cluster.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden partial folder left


def test_a_rerun_into_its_own_output_replaces_it(tmp_path, photos, capsys):
    out = tmp_path / "out"
    main(["cluster", str(photos), "--out", str(out), *FAST])
    first = json.loads((out / output.MARKER).read_text())
    assert first["written_by"] == "clusterlab cluster" and "report.html" in first["files"]
    assert set(first["files"]) == {
        p.relative_to(out).as_posix() + ("/" if p.is_dir() else "") for p in out.rglob("*")
    } - {output.MARKER}
    (out / "report.html").write_text("an old report")  # a listed file, changed: still ours to replace
    main(["cluster", str(photos), "--out", str(out), *FAST, "--seed", "1"])
    second = json.loads((out / output.MARKER).read_text())
    assert second["run_id"] != first["run_id"]
    assert (out / "report.html").read_text() != "an old report"
    assert json.loads((out / "cluster.json").read_text())["seed"] == 1
    # An earlier output with one file of the user's added afterwards is no longer only ours.
    (out / "clusters" / "my-favourite.png").write_bytes(b"mine")
    assert "my-favourite.png, which" in one_line(capsys, photos, "--out", out, *FAST)
    assert (out / "clusters" / "my-favourite.png").read_bytes() == b"mine"


def test_a_fit_never_touches_what_else_is_in_the_runs_folder(in_tmp):
    """--runs_dir holding a user's files, one with a run folder's name pattern: a fit makes its own
    new folder and leaves every other file as it was."""
    runs = in_tmp / "shared-runs"
    (runs / "tiny" / "20200101-000000-seed3").mkdir(parents=True)
    (runs / "tiny" / "20200101-000000-seed3" / "results.csv").write_text("a user's table")
    (runs / "notes.md").write_text("which runs to keep")
    before = snapshot(runs)
    (in_tmp / "tiny.yaml").write_text(TINY_CC)
    main(["fit", "--config", "tiny.yaml", "--trainer.max_epochs", "1", "--runs_dir", str(runs)])
    after = snapshot(runs)
    assert {k: v for k, v in after.items() if k in before} == before
    new = {Path(k).parts[1] for k in after if k not in before}
    assert len(new) == 1 and new != {"20200101-000000-seed3"}
    assert os.listdir(runs / "tiny" / "20200101-000000-seed3") == ["results.csv"]

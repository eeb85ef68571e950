"""`fit --ckpt_path last` continues a killed run to the same weights as an uninterrupted run."""

from tests.helpers import TINY_CC, kill_and_resume


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_CC)
    kill_and_resume(tmp_path, "tiny.yaml")  # same epoch, step and weights as the uninterrupted run
    assert len(list((tmp_path / "runs" / "killed").iterdir())) == 1  # it continued in the same run directory
    run_dir = next((tmp_path / "runs" / "killed").iterdir())
    assert (run_dir / "metrics.json").exists()
    # The log of the killed part is kept: metrics.csv still has the rows of epochs 0 and 1.
    epochs = {row.split(",")[0] for row in (run_dir / "metrics.csv").read_text().splitlines()[1:]}
    assert {"0", "1", "2", "3"} <= epochs

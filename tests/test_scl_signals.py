"""benchmarks/scl_signals.py on real SCL run folders: with restarts, the kept restart's signals."""

import csv
import json
import sys
from pathlib import Path

import pytest

from clusterlab.cli import main
from tests.helpers import REPO, TINY_SCL

sys.path.insert(0, str(Path(REPO, "benchmarks")))

import scl_signals  # noqa: E402


@pytest.mark.timeout(600)
def test_a_run_with_restarts_reports_the_kept_restarts_concept_loss(in_tmp):
    # 4 epochs as 2 restarts of 2; the kept one's score, not the mean of the last restart's epochs.
    config = TINY_SCL.replace("memory_size: 90", "memory_size: 90\n    restarts: 2")
    config = config.replace("T_max: 4", "T_max: 2")
    Path("tiny.yaml").write_text(config)
    main(["fit", "--config", "tiny.yaml", "--seed_everything", "0"])
    run = next(Path("runs", "tiny").glob("*/"))
    restarts = json.loads((run / "metrics.json").read_text())["restarts"]
    signals = scl_signals.signals(run)
    assert signals["concept_loss"] == pytest.approx(restarts["scores"][restarts["selected"]])
    assert len(signals["sizes"]) == 10 and sum(signals["sizes"]) == 1797
    # Another window than the run's own: the last epochs of metrics.csv (here all 4, both restarts').
    with open(run / "metrics.csv", newline="") as f:
        rows = csv.DictReader(f)
        epochs = [float(row[scl_signals.CONCEPT]) for row in rows if row.get(scl_signals.CONCEPT)]
    assert len(epochs) == 4
    assert scl_signals.signals(run, last=4)["concept_loss"] == pytest.approx(sum(epochs) / 4)
    assert sum(epochs) / 4 != pytest.approx(signals["concept_loss"])

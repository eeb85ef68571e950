"""metrics.csv across the parts of a killed and resumed run: never missing, every step once."""

import csv
from pathlib import Path

from clusterlab.loggers import CSVLogger

EARLIER = [  # what the killed part wrote: epochs 0-1 trained and checkpointed, epoch 2 half-way
    {"epoch": "0", "step": "2", "train/loss": "4.0"},
    {"epoch": "0", "step": "3", "val/acc": "0.3"},
    {"epoch": "1", "step": "5", "train/loss": "3.0"},
    {"epoch": "2", "step": "7", "train/loss": "2.0"},
]
CHECKPOINT = {"epochs_trained": 2, "epoch": 1, "global_step": 6}


def write_earlier(folder: Path) -> None:
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "train/loss", "val/acc"])
        writer.writeheader()
        writer.writerows(EARLIER)


def rows(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


def test_a_resumed_part_keeps_the_rows_before_its_checkpoint_on_disk_before_it_logs(tmp_path):
    write_earlier(tmp_path)
    logger = CSVLogger(str(tmp_path))
    logger.continue_from(CHECKPOINT)
    assert logger.experiment is not None  # the writer exists: a kill now must lose no earlier row
    assert rows(tmp_path) == EARLIER[:3]
    logger.log_metrics({"train/loss": 2.5, "epoch": 2}, step=7)
    logger.log_metrics({"train/loss": 2.0, "new/column": 1.0, "epoch": 2}, step=8)  # rewrites the header
    logger.save()
    assert [r["step"] for r in rows(tmp_path)] == ["2", "3", "5", "7", "8"]
    assert rows(tmp_path)[-1]["new/column"] == "1.0" and not list(tmp_path.glob("*.tmp"))


def test_a_part_with_nothing_to_continue_from_starts_a_fresh_log(tmp_path):
    write_earlier(tmp_path)
    logger = CSVLogger(str(tmp_path))
    logger.log_metrics({"train/loss": 9.0, "epoch": 0}, step=0)
    logger.save()
    assert rows(tmp_path) == [{"epoch": "0", "step": "0", "train/loss": "9.0"}]


def test_continuing_after_the_writer_was_made_still_keeps_the_earlier_rows(tmp_path):
    write_earlier(tmp_path)
    logger = CSVLogger(str(tmp_path))
    assert logger.experiment is not None
    logger.continue_from(CHECKPOINT)
    assert rows(tmp_path) == EARLIER[:3]

"""`clusterlab predict`: which image is in which cluster, written as the batches come.

<run dir>/assignments.csv has one row per readable image, in the order of a sorted walk of the
folder: `index,path,cluster,confidence` (path is empty for data sets without files; a path a
spreadsheet would run as a formula, `=1+1.png`, is written `'=1+1.png`: clusterlab.csvsafe). Rows are
written batch by batch, so a method that predicts online (all of clusterlab's) needs no pass
over the whole data set first. <run dir>/clusters/cluster_<k>.png is a contact sheet of cluster
k's most confident images. It is kept as a running top-N, so streaming needs no second pass
either. Unreadable images are reported by path in skipped.csv and at the end of the run.
"""

from __future__ import annotations

import csv
import heapq
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import BasePredictionWriter
from rich.console import Console

from clusterlab import csvsafe
from clusterlab.callbacks.figures import Clusterer
from clusterlab.contracts import require
from clusterlab.distributed import is_distributed


class AssignmentWriter(BasePredictionWriter):
    """Writes assignments.csv and one contact sheet per cluster during `predict`.

    Args:
        sheet_images: images per contact sheet (the cluster's most confident ones).
    """

    def __init__(self, sheet_images: int = 48) -> None:
        super().__init__(write_interval="batch")
        self.sheet_images = sheet_images

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict":
            require(pl_module, Clusterer, self)

    def on_predict_start(self, trainer: pl.Trainer, pl_module) -> None:
        folder = Path(trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = trainer.datamodule.eval_paths
        name = "assignments.csv" if trainer.world_size == 1 else f"assignments.rank{trainer.global_rank}.csv"
        self.file = open(folder / name, "w", newline="")
        self.rows = csv.writer(self.file)
        self.rows.writerow(["index", "path", "cluster", "confidence"])
        self.best: dict[int, list[tuple[float, int]]] = {}  # cluster -> min-heap of (confidence, index)
        self.written: set[int] = set()

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        for index, cluster, confidence in zip(
            prediction["index"].tolist(), prediction["cluster"].tolist(), prediction["confidence"].tolist()
        ):
            path = self.paths[index] if self.paths else ""
            self.rows.writerow([index, csvsafe.cell(path), cluster, f"{confidence:.4f}"])
            heap = self.best.setdefault(cluster, [])
            (heapq.heappush if len(heap) < self.sheet_images else heapq.heappushpop)(
                heap, (confidence, index)
            )
            self.written.add(index)
        self.file.flush()

    def on_predict_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.file.close()
        folder = Path(trainer.default_root_dir)
        best, written = self.best, self.written
        if is_distributed():  # only rank 0 writes: the shares (a set of every index) go to it alone
            shares = [None] * dist.get_world_size() if trainer.is_global_zero else None
            dist.gather_object((best, written), shares, dst=0)
        if is_distributed() and trainer.is_global_zero:
            best = {
                c: heapq.nlargest(self.sheet_images, [x for b, _ in shares for x in b.get(c, [])])
                for c in {c for b, _ in shares for c in b}
            }
            written = set().union(*(w for _, w in shares))
            _merge_parts(folder, trainer.world_size)  # every rank closed its part before the gather
        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        counts = _cluster_sizes(folder / "assignments.csv")
        sheets = folder / "clusters"
        sheets.mkdir(exist_ok=True)
        for cluster, heap in sorted(best.items()):
            ranked = sorted(heap, reverse=True)
            contact_sheet(
                data.eval_images(torch.tensor([index for _, index in ranked])),
                [c for c, _ in ranked],
                f"cluster {cluster}: {counts[cluster]} images (the {len(ranked)} most confident)",
                sheets / f"cluster_{cluster:02d}.png",
            )
        skipped = _skipped(data, written)
        console = Console()
        console.print(
            f"Predicted {len(written)} images into {len(counts)} clusters: {folder / 'assignments.csv'}; "
            f"contact sheets in {sheets}",
            highlight=False,
        )
        if skipped:
            with open(folder / "skipped.csv", "w", newline="") as f:
                csv.writer(f).writerows([("path", "reason"), *map(csvsafe.row, skipped)])
            console.print(f"Skipped {len(skipped)} unreadable image(s) (skipped.csv):", highlight=False)
            for path, reason in skipped[:20]:
                console.print(f"  {path}: {reason}", highlight=False, markup=False)


def _cluster_sizes(path: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            counts[int(row["cluster"])] = counts.get(int(row["cluster"]), 0) + 1
    return counts


def _skipped(data, written: set[int]) -> list[tuple[str, str]]:
    """(path, reason) of every image that could not be read."""
    reasons = dict(getattr(data.source, "skipped", []))  # decoded in this process: the reason is known
    if data.predict_set is None:  # loaded whole: the loader left the unreadable ones out already
        return list(reasons.items())
    return [
        (str(p), reasons.get(str(p), "unreadable (decoded in a worker; see its warning)"))
        for i, p in enumerate(data.predict_set.paths)
        if i not in written
    ]


def _merge_parts(folder: Path, world: int) -> None:
    """One assignments.csv in folder order from the processes' parts (their cells already
    went through csvsafe: copied as they are)."""
    rows = []
    for rank in range(world):
        part = folder / f"assignments.rank{rank}.csv"
        with open(part, newline="") as f:
            rows += list(csv.reader(f))[1:]
        part.unlink()
    with open(folder / "assignments.csv", "w", newline="") as f:
        csv.writer(f).writerows(
            [["index", "path", "cluster", "confidence"], *sorted(rows, key=lambda r: int(r[0]))]
        )


def contact_sheet(
    images: torch.Tensor, confidences: list[float], title: str, path: Path, columns: int = 8
) -> None:
    from clusterlab.callbacks.figures import as_picture, pyplot

    plt = pyplot()
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.2 + 0.6), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if k < len(images):
            picture, cmap = as_picture(images[k])
            ax.imshow(picture, cmap=cmap, interpolation="nearest")
            ax.set_title(f"{confidences[k]:.2f}", fontsize=7, pad=1)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

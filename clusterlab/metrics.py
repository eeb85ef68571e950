"""Clustering metrics: Hungarian-matched accuracy (ACC), NMI, ARI, AMI and many-to-one ACC, as
torchmetrics Metrics.

Being torchmetrics Metrics, they gather their state over ranks on `compute()`, so the figures are
the same whether the evaluation set was split over one process or many. Samples whose label is
unknown (-1) are left out: labels are only ever used to *report* these numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_mutual_info_score
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.clustering import NormalizedMutualInfoScore
from torchmetrics.utilities import dim_zero_cat


def contingency(preds: Tensor, target: Tensor) -> Tensor:
    """Counts table: rows = predicted clusters, columns = classes."""
    preds, target = preds.long().cpu(), target.long().cpu()
    num_clusters, num_classes = int(preds.max()) + 1, int(target.max()) + 1
    counts = torch.bincount(preds * num_classes + target, minlength=num_clusters * num_classes)
    return counts.reshape(num_clusters, num_classes)


def hungarian_match(preds: Tensor, target: Tensor) -> dict[int, int]:
    """The one-to-one map cluster -> class with the most samples on the diagonal.

    With more clusters than classes (or fewer), the surplus clusters (classes) stay unmatched:
    their samples count as errors in ACC.
    """
    table = contingency(preds, target).numpy()
    rows, cols = linear_sum_assignment(table, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols)}


class _Labelling(Metric):
    """The state of a metric of one labelling: every sample's cluster and class, gathered over
    ranks on `compute()`."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.preds.append(preds.long())
        self.target.append(target.long())

    def compute(self) -> Tensor:
        preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        if preds.numel() == 0:
            return torch.tensor(float("nan"))
        return self.score(contingency(preds, target))

    def score(self, table: Tensor) -> Tensor:
        """The metric of the contingency table (clusters x classes) of every sample."""
        raise NotImplementedError


class HungarianAccuracy(_Labelling):
    """ACC: the fraction of samples whose cluster is matched to their class by the Hungarian method."""

    def score(self, table: Tensor) -> Tensor:
        counts = table.numpy()
        rows, cols = linear_sum_assignment(counts, maximize=True)
        return torch.tensor(counts[rows, cols].sum() / counts.sum(), dtype=torch.float64)


class ManyToOneAccuracy(_Labelling):
    """Many-to-one ACC: each cluster mapped to its most frequent class (several clusters may map to
    one class). The score of over-clustering (K > classes), where the one-to-one Hungarian map leaves
    clusters unmatched; with K = classes it is at least ACC."""

    def score(self, table: Tensor) -> Tensor:
        counts = table.double()
        return counts.max(dim=1).values.sum() / counts.sum()


class AdjustedMutualInfo(_Labelling):
    """AMI (arithmetic normalisation): NMI corrected for the agreement expected by chance, which
    grows with the number of clusters. scikit-learn's expected mutual information on the table's
    labelling (torchmetrics' takes over a minute at 70,000 samples, this a tenth of a second)."""

    def score(self, table: Tensor) -> Tensor:
        counts = table.cpu().numpy()
        clusters, classes = np.nonzero(counts)
        repeats = counts[clusters, classes]
        ami = adjusted_mutual_info_score(np.repeat(classes, repeats), np.repeat(clusters, repeats))
        return torch.tensor(ami, dtype=torch.float64)


def _pairs(counts: Tensor) -> Tensor:
    """C(n, 2) of every count, in float64 (exact below 2^53 pairs: any data set)."""
    counts = counts.double()
    return counts * (counts - 1) / 2


class AdjustedRandScore(_Labelling):
    """ARI (Hubert & Arabie 1985) from the contingency table in int64 / float64.

    torchmetrics' own (1.x) overflows on large sets, where it departs from scikit-learn's, and a
    folder given to `clusterlab cluster` can hold any number of images (tests/test_metrics.py;
    figures: docs/results.md, "Measurements behind design choices")."""

    def score(self, table: Tensor) -> Tensor:
        together = _pairs(table).sum()
        rows, cols = _pairs(table.sum(1)).sum(), _pairs(table.sum(0)).sum()
        expected = rows * cols / _pairs(table.sum())
        best = (rows + cols) / 2
        if best == expected:  # one cluster and one class, or every sample alone: a perfect match
            return torch.tensor(1.0, dtype=torch.float64)
        return (together - expected) / (best - expected)


class ClusteringMetrics(MetricCollection):
    """ACC (Hungarian), NMI and AMI (arithmetic normalisation, as scikit-learn's default), ARI and
    many-to-one ACC of one labelling.

    Args:
        sync_on_compute: gather the state of every process on `compute()` (a collective, which
            every process must reach); False: this process's samples only.
    """

    def __init__(self, prefix: str | None = None, sync_on_compute: bool = True) -> None:
        sync = {"sync_on_compute": sync_on_compute}
        super().__init__(
            {
                "acc": HungarianAccuracy(**sync),
                "nmi": NormalizedMutualInfoScore(average_method="arithmetic", **sync),
                "ari": AdjustedRandScore(**sync),
                "ami": AdjustedMutualInfo(**sync),
                "many_to_one_acc": ManyToOneAccuracy(**sync),
            },
            prefix=prefix,
            compute_groups=False,
        )
        self.labelled = 0  # samples with a known label seen since the last reset (this process)

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        known = target >= 0
        if known.any():
            super().update(preds[known].long(), target[known].long())
            self.labelled += int(known.sum())

    def reset(self) -> None:
        super().reset()
        self.labelled = 0


def evaluate(preds: Tensor | np.ndarray, target: Tensor | np.ndarray) -> dict[str, float]:
    """ACC / NMI / ARI / AMI / many-to-one ACC of one labelling, computed in this process alone: no
    collective, so that work only rank 0 does (reports, figures) can call it."""
    metrics = ClusteringMetrics(sync_on_compute=False)
    metrics.update(torch.as_tensor(np.asarray(preds)), torch.as_tensor(np.asarray(target)))
    if not metrics.labelled:
        return {}
    return {name: float(value) for name, value in metrics.compute().items()}


def graph_bcubed(graph: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """BCubed precision and recall of a graph's neighbourhoods against the classes (Amigo et al.,
    2009; dccm-paper Fig. 5 on the pseudo-graph). For each sample i, with N(i) = {j : W_ij} (i
    included) and C(i) the samples of i's class: precision_i = |N(i) & C(i)| / |N(i)| and
    recall_i = |N(i) & C(i)| / |C(i)|, each averaged over the samples. A diagnostic only.
    """
    graph = graph | torch.eye(len(graph), dtype=torch.bool, device=graph.device)
    same_class = labels[:, None] == labels[None, :]
    hits = (graph & same_class).sum(1).double()
    return (hits / graph.sum(1)).mean(), (hits / same_class.sum(1)).mean()

"""What every clustering method shares.

A method subclasses `ClusteringMethod`, sets `self.views` and `self.cluster_head` (a
`clusterlab.nn.ClusterHead`: trained heads, or a k-means head fitted at every evaluation), writes
`training_step` the way its paper's algorithm reads, and returns `self.objective(terms)`. If its
head reads other features than the backbone's, it says which (`cluster_features`); to run on a
folder of photos (`clusterlab cluster FOLDER --method ...`), it declares a `folder_recipe`. The
base class does the rest, the same way for every method:

- evaluation: ACC / NMI / ARI per head, from the per-sample outputs of the evaluation set
  gathered to rank 0 (`clusterlab.passes.SampleOutputs`), labels used only to report them; a
  fitted head (k-means) is fitted there, on the whole set;
  cluster sizes and a collapse check (no label involved), broadcast to every rank;
- label-free head selection: the head with the lowest unsupervised training loss (SCAN's rule),
  or (`combine_heads="vote"`) the heads' vote, each head's clusters renamed after the selected
  head's by their co-assignments over the last training epoch;
- online prediction: cluster and confidence of any batch, a single image included (`assign`);
- renumbering the clusters in place (`permute_clusters_`: the folder command orders them by size);
- optimizer and schedule from the config (`optimizer`, `lr_scheduler` callables);
- per-step reseeding, so that a resumed run repeats the same random draws (clusterlab.seeding);
- a divergence guard that names the loss term, step and learning rate, or the parameter;
- checkpoints that say which method wrote them, and refuse to load into another;
- restarts (`restarts` R > 1, for a method that names a label-free `restart_criterion`): the run's
  epochs are R runs of equal length one after another, each from weights and state drawn afresh,
  and the one whose criterion ends lowest is kept, as k-means keeps the best of its restarts.

A method without a trained cluster head makes its `cluster_head` a `clusterlab.nn.KMeansHead`
(SimCLR; CC's "ICH only"; SCL without its target task): nothing more.
"""

from __future__ import annotations

import math
from abc import ABC
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import pytorch_lightning as pl
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from clusterlab import __version__
from clusterlab.distributed import all_reduce_sum, broadcast_object
from clusterlab.errors import CheckpointMismatchError, ConfigError, DivergenceError
from clusterlab.loggers import logs_this_step
from clusterlab.metrics import evaluate
from clusterlab.nn.heads import ClusterHead
from clusterlab.nn.init import redraw_
from clusterlab.passes import SampleOutputs, Step, pass_over
from clusterlab.seeding import derive_seed, reseed

OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]
LRSchedulerCallable = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


ADAM = {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}}


@dataclass(frozen=True)
class FolderRecipe:
    """How `clusterlab cluster FOLDER --method <the method>` builds the method for a folder of
    photos: what is specific to the method, as config values (class paths and init args, what
    config.yaml records). The folder command adds what is the same for every method: the
    backbone, K, the image size, the horizontal flip and the per-image standardisation of the views
    (clusterlab.cluster.recipe).

    Args:
        views: the class path of the method's views.
        view_args: their init args beside size, flip and standardize.
        optimizer: the optimizer, a class path with init args.
        lr_scheduler: the scheduler of a run of E epochs, or None: a constant rate.
        sizes: init args that depend on the folder: of N images and K clusters.
        args: other init args of the method.
        pretext_checkpoint: the method starts from a pretext's checkpoint (init arg
            `pretext_checkpoint`): the command trains SimCLR on the folder first and hands it over.
        warm_start: when the command trained SimCLR on the folder anyway (K chosen from its
            features), the method's backbone starts from SimCLR's.
        frozen_features: the method trains on a frozen backbone's features, not the backbone: the
            command can give it a pretrained network (`--backbone NAME [--weights FILE]`) in place
            of the folder's SimCLR pretext; its views are then the images as they are.
    """

    views: str
    view_args: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=lambda: dict(ADAM))
    lr_scheduler: Callable[[int], dict] | None = None
    sizes: Callable[[int, int], dict] = lambda num_images, num_clusters: {}
    args: dict = field(default_factory=dict)
    pretext_checkpoint: bool = False
    warm_start: bool = False
    frozen_features: bool = False


class ClusteringMethod(pl.LightningModule, ABC):
    """Base class of CC, NNM, SCL, DCCM and SimCLR.

    A subclass sets `self.views` (its `Views`) and `self.cluster_head` (a `ClusterHead`) in its
    `__init__`, and may declare `folder_recipe` (a `FolderRecipe`), which `clusterlab cluster`
    builds it from.

    A subclass calls `self.save_hyperparameters()` in its `__init__` (built by the CLI, that saves
    the parsed config; the checkpoint then rebuilds the method) and reads them as
    `self.hparams.<name>`. Loss-term switches are named `use_<term>`.

    Args:
        num_clusters: C, the number of clusters (linked from the data module by the CLI).
        backbone: feature extractor with an `out_dim` attribute.
        num_heads: number of cluster heads the method trains.
        optimizer: builds the optimizer from the parameters (a class path with init_args in YAML).
        lr_scheduler: builds a learning-rate scheduler from the optimizer; None: constant rate.
        restarts: R: the run's max_epochs are R restarts of max_epochs / R epochs each, one after
            another, each from freshly drawn weights and state (`reinitialise_`), a fresh optimizer
            state and a fresh learning-rate schedule; the restart whose `restart_criterion` (mean
            over its last 10 epochs) is lowest is the run's model. 1: one run, no restart. Costs R
            times the compute of one run. Needs a method with a `restart_criterion`. A run stopped
            inside a restart (trainer.max_time) keeps the best finished one: the restart cut short
            is not compared.
        combine_heads: how the heads make the run's one partition. "select": the selected head's
            (the lowest loss). "vote": every head's probabilities averaged, once each head's
            clusters are renamed after the selected head's (relabelling and voting, as bagged
            clustering: Dudoit and Fridlyand, Bioinformatics 2003). A method that offers "vote"
            calls `record_head_assignments` in its training step.
    """

    folder_recipe: ClassVar[FolderRecipe | None] = None
    cluster_head: ClusterHead
    # The loss term (a key of the terms given to `objective`) whose mean over a restart's last
    # RESTART_WINDOW epochs ranks restarts (`restarts`); None: the method offers no restarts.
    restart_criterion: ClassVar[str | None] = None
    RESTART_WINDOW: ClassVar[int] = 10

    def __init__(
        self,
        num_clusters: int,
        backbone: nn.Module,
        num_heads: int = 1,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        combine_heads: str = "select",
        restarts: int = 1,
    ) -> None:
        super().__init__()
        if combine_heads not in ("select", "vote"):
            raise ConfigError(f'combine_heads must be "select" or "vote", not {combine_heads!r}')
        if restarts < 1:
            raise ConfigError(f"restarts must be at least 1, not {restarts}")
        if restarts > 1 and self.restart_criterion is None:
            raise ConfigError(f"{type(self).__name__} has no restart criterion: restarts must be 1")
        self.restarts = restarts
        self.num_clusters, self.num_heads = num_clusters, num_heads
        self.combine_heads = combine_heads
        self.backbone = backbone
        self.build_optimizer, self.build_lr_scheduler = optimizer, lr_scheduler
        # Mean unsupervised loss of each head over the last training epoch: selects the head. The
        # running sums of the epoch in progress are buffers too, so that a run resumed from a
        # checkpoint inside an epoch selects the same head as an uninterrupted one.
        self.register_buffer("head_loss", torch.full((num_heads,), float("nan")))
        self.register_buffer("head_loss_sum", torch.zeros(num_heads))
        self.register_buffer("head_loss_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("epochs_trained", torch.zeros((), dtype=torch.long))
        if combine_heads == "vote":
            # How often head h put a sample in its cluster i while head g put it in its cluster j,
            # over the epoch in progress (heads x heads x C x C); from the last epoch's, each head's
            # cluster matched to each of the selected head's (heads x C). Buffers, as the losses.
            pairs = torch.zeros(num_heads, num_heads, num_clusters, num_clusters)
            self.register_buffer("head_agreement", pairs)
            self.register_buffer("head_alignment", torch.arange(num_clusters).repeat(num_heads, 1))
        if restarts > 1:
            # Each restart's score, once it ended; the criterion's mean of each of the last
            # RESTART_WINDOW epochs of the restart in progress; its running sum in the epoch in
            # progress. Buffers: a resumed run continues the restart it was in.
            self.register_buffer("restart_scores", torch.full((restarts,), float("nan")))
            self.register_buffer("criterion_epochs", torch.full((self.RESTART_WINDOW,), float("nan")))
            self.register_buffer("criterion_sum", torch.zeros(()))
            self.register_buffer("criterion_steps", torch.zeros((), dtype=torch.long))
        # The state of the best restart so far (CPU copies; in the checkpoint, beside the weights).
        self._best_restart: dict[str, Tensor] | None = None
        self.restart_cut_short: int | None = None  # the restart a stop inside it left uncompared
        self._batch_size: int | None = None
        self._evaluation = SampleOutputs()
        self.eval_results: dict = {}
        self.input_shape: list[int] | None = None  # C, H, W of the training images (for predict on a folder)
        # Label-based diagnostics of the features (neighbour label agreement, ...): reported in
        # metrics.json next to ACC / NMI / ARI, never used to choose anything.
        self.diagnostics: dict[str, float] = {}

    # -- what a method provides -------------------------------------------------------------

    def cluster_features(self, x: Tensor) -> Tensor:
        """The features the cluster head reads, of the (float, un-augmented) input: the backbone's,
        unless the method's head reads others."""
        return self.backbone(x)

    def backbones(self) -> list[nn.Module]:
        """Every backbone the method trains (what `Speed` compiles): the one, unless a method has more."""
        return [self.backbone]

    def cluster_logits(self, x: Tensor) -> Tensor:
        """Cluster logits of the (float, un-augmented) input: num_heads x B x C."""
        return self.cluster_head(self.cluster_features(x))

    def plain(self, images: Tensor) -> Tensor:
        """The evaluation input: the method's views without augmentation."""
        return self.views.plain(images)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Features of uint8 images for embedding plots: the backbone's, unless a method knows better."""
        return self.backbone(self.plain(images))

    def pass_over_training_set(
        self, step: Step, rank0_only: bool | Collection[str] = True, description: str | None = None
    ) -> dict[str, Tensor]:
        """`step(batch)` over the whole training set in dataset order, in eval mode, in the run's
        precision (`clusterlab.passes.pass_over`): the pass behind every head start, NNM's global
        neighbours and SCL's refresh. `rank0_only` outputs reach rank 0 only (what it clusters)."""
        return pass_over(
            self,
            self.trainer.datamodule.train_eval_dataloader(),
            step,
            precision=self.trainer.precision_plugin,
            description=description,
            rank0_only=rank0_only,
        )

    # -- training ---------------------------------------------------------------------------

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        reseed(self.current_epoch, batch_idx, self.global_rank)
        self._batch_size = len(batch["index"])
        trainer = self._trainer
        # The divergence guard reads its device flags when Lightning reads the logged values anyway
        # (every log_every_n_steps) and on each epoch's last batch, before validation uses the weights.
        self._read_divergence = trainer is None or (
            logs_this_step(trainer) or batch_idx + 1 >= trainer.num_training_batches
        )

    def objective(self, terms: dict[str, Tensor], head_losses: Tensor | None = None) -> Tensor:
        """The total loss: the sum of the (already weighted) terms. Logs each term, stops the run on
        a non-finite one, and records each head's loss for label-free head selection."""
        loss = torch.stack(list(terms.values())).sum()
        self._watch_loss(terms, loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=self._batch_size)
        self.log_dict(
            {f"train/{name}": value.detach() for name, value in terms.items()},
            on_step=False,
            on_epoch=True,
            batch_size=self._batch_size,
        )
        per_head = head_losses if head_losses is not None else loss.expand(self.num_heads)
        self.head_loss_sum += per_head.detach().float()  # stays on the device: no sync per step
        self.head_loss_steps += 1
        if self.restarts > 1 and self.restart_criterion in terms:  # on the device, as the head losses
            self.criterion_sum += terms[self.restart_criterion].detach().float()
            self.criterion_steps += 1
        return loss

    def record_head_assignments(self, probabilities: Tensor) -> None:
        """Counts each pair of heads' clusters of the global batch (num_heads x B x C probabilities,
        the same on every process, so that no count needs a reduction), for the vote's alignment.
        Nothing unless combine_heads is "vote"."""
        if self.combine_heads != "vote":
            return
        clusters = probabilities.detach().argmax(-1, keepdim=True)
        # scatter_, not F.one_hot: one_hot checks its input's range, a read of the device
        onehot = torch.zeros_like(probabilities, dtype=torch.float).scatter_(-1, clusters, 1.0)
        self.head_agreement += torch.einsum("hbi,gbj->hgij", onehot, onehot)  # on the device: no sync

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # A step can leave the loss finite and the weights or running statistics not (a huge
        # learning rate): stop before anything downstream (evaluation, figures) uses them.
        named = self._watched_tensors()
        if named:
            finite = torch.stack([t.abs().amax() for _, t in named]).isfinite().all()
            self._flag_divergence("parameter_step", ~finite, self.global_step)
        if getattr(self, "_read_divergence", True):
            self.check_divergence()

    def on_fit_start(self) -> None:
        if self.restarts > 1:
            self.restart_length()  # a max_epochs the restarts cannot share: one line, before training
        train_set = getattr(self.trainer.datamodule, "train_set", None) if self.trainer.datamodule else None
        if train_set is not None:
            self.input_shape = list(train_set.images.shape[1:])

    def on_train_end(self) -> None:
        self.check_divergence()  # a run stopped by max_steps between two reads

    # -- the divergence guard -----------------------------------------------------------------
    # Whether a loss or a parameter is finite is known on the device; reading it every step would
    # make the host wait for the device every step. The guard keeps, on the device, the first step
    # with a non-finite loss (and its terms' values) and the first with a non-finite parameter, and
    # reads both in one transfer when Lightning reads the logged values anyway (`_read_divergence`),
    # so a diverged run stops within log_every_n_steps steps, naming the first bad step.

    def _watched_tensors(self) -> list[tuple[str, Tensor]]:
        """What a step can change: the trained parameters and the buffers. Not the frozen parameters:
        a pretrained backbone's stay as loaded (millions of values to read for nothing every step),
        and a momentum encoder's follow trained ones, which are watched."""
        parameters = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [
            (n, t.detach())
            for n, t in (*parameters, *self.named_buffers())
            if t.is_floating_point()
            and t.numel()
            and not n.startswith(("head_loss", "head_agreement", *_RESTART_BUFFERS))
        ]

    def _divergence_state(self, device: torch.device) -> dict:
        state = self.__dict__.get("_divergence")
        if state is None or state["loss_step"].device != device:
            minus_one = torch.tensor(-1, device=device)
            state = {"loss_step": minus_one, "parameter_step": minus_one, "terms": {}, "context": {}}
            self.__dict__["_divergence"] = state  # not a buffer: no part of the checkpoint
        return state

    def _flag_divergence(self, key: str, bad: Tensor, step: int) -> Tensor:
        """Records `step` as the first bad one of `key` if `bad` and none was; returns whether
        this step is that first one (on the device)."""
        state = self._divergence_state(bad.device)
        if not state["context"] or max(state["context"]) < step:
            state["context"][step] = (self.current_epoch, self._learning_rate())
        first = bad & (state[key] < 0)
        state[key] = torch.where(first, step, state[key])
        return first

    def _watch_loss(self, terms: dict[str, Tensor], loss: Tensor) -> None:
        first = self._flag_divergence("loss_step", ~torch.isfinite(loss.detach()), self.global_step)
        values = self._divergence_state(loss.device)["terms"]
        for name, value in terms.items():
            value = value.detach().float()
            values[name] = torch.where(first, value, values.get(name, torch.zeros_like(value)))
        if self._trainer is None:  # called on its own (a test): no logging step to wait for
            self.check_divergence()

    def check_divergence(self) -> None:
        """Raises DivergenceError if a loss or a parameter was non-finite at a step since the last
        check (one read of the device's flags: call it where the host waits anyway)."""
        state = self.__dict__.get("_divergence")
        if state is None:
            return
        names = list(state["terms"])
        flags = torch.stack([state["loss_step"], state["parameter_step"]]).tolist()
        context = state["context"]
        if flags == [-1, -1]:
            context.clear()
            return
        loss_step, parameter_step = flags
        if loss_step >= 0:
            epoch, lr = context.get(loss_step, (self.current_epoch, self._learning_rate()))
            values = torch.stack([state["terms"][name] for name in names]).tolist() if names else []
            bad = {name: value for name, value in zip(names, values) if not math.isfinite(value)}
            raise DivergenceError(
                f"{type(self).__name__} diverged: non-finite loss at epoch {epoch}, step {loss_step} "
                f"(lr {lr}): "
                + ", ".join(f"{name} = {value}" for name, value in bad.items())
                + ". Lower the learning rate, or check the input data."
            )
        epoch, lr = context.get(parameter_step, (self.current_epoch, self._learning_rate()))
        broken = [name for name, t in self._watched_tensors() if not t.isfinite().all()]
        raise DivergenceError(
            f"{type(self).__name__} diverged: parameters are no longer finite after epoch "
            f"{epoch}, "
            f"step {parameter_step} (lr {lr}; {', '.join(broken[:3])}"
            + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
            + "). Lower the learning rate."
        )

    def _learning_rate(self) -> str:
        trainer = self._trainer
        if trainer is None or not trainer.optimizers:
            return "unknown"
        return ", ".join(f"{group['lr']:g}" for group in trainer.optimizers[0].param_groups[:2])

    def on_train_epoch_start(self) -> None:
        self.head_loss_sum.zero_()
        self.head_loss_steps.zero_()
        if self.combine_heads == "vote":
            self.head_agreement.zero_()
        if self.restarts > 1:
            self.criterion_sum.zero_()
            self.criterion_steps.zero_()

    def on_train_epoch_end(self) -> None:
        steps = all_reduce_sum(self.head_loss_steps.float())
        total = all_reduce_sum(self.head_loss_sum)
        if steps > 0:
            self.head_loss.copy_(total / steps)
            if self.num_heads > 1:  # what selects the head, per epoch in metrics.csv
                self.log_dict({f"train/loss_head{h}": loss for h, loss in enumerate(self.head_loss)})
        if self.combine_heads == "vote" and self.head_agreement.sum() > 0:  # one read per epoch
            self.head_alignment.copy_(match_clusters(self.head_agreement[:, self.selected_head]))
        self.epochs_trained += 1  # before the epoch's checkpoint (Lightning saves after this hook)
        if self.restarts > 1:  # before the checkpoint too: it holds the next restart's start, or the kept one
            self._restart_epoch_end()

    @property
    def selected_head(self) -> int:
        """The head with the lowest unsupervised loss (no labels involved); 0 before any training."""
        if torch.isnan(self.head_loss).all():
            return 0
        return int(torch.nan_to_num(self.head_loss, nan=math.inf).argmin())

    # -- restarts -------------------------------------------------------------------------------
    # With `restarts` R > 1, epoch e belongs to restart e // (max_epochs / R). At the end of a
    # restart's last epoch (before that epoch's checkpoint is written) its score is recorded, its
    # state kept if the score is the lowest so far, and the next restart begins: weights and state
    # drawn afresh, the optimizer's state emptied, the schedule built again. At the end of the run
    # the kept state is loaded, so the checkpoint and the report hold the best restart.

    def reinitialise_(self, restart: int) -> None:
        """Draw the method's weights and state afresh (torch's generator is seeded for `restart`):
        every layer by default; a method with more state (memories, tables, moving averages)
        resets that too."""
        redraw_(self)

    def restart_length(self) -> int:
        epochs = self.trainer.max_epochs
        if self.trainer.fast_dev_run:  # a smoke test of a batch or a few (max_epochs 1): one restart
            return max(epochs or 1, 1)
        if epochs is None or epochs < self.restarts or epochs % self.restarts:
            raise ConfigError(
                f"restarts {self.restarts}: trainer.max_epochs must be a multiple of it (each restart "
                f"trains max_epochs / restarts epochs), not {epochs}"
            )
        return epochs // self.restarts

    def _restart_epoch_end(self) -> None:
        steps = all_reduce_sum(self.criterion_steps.float())
        mean = all_reduce_sum(self.criterion_sum) / steps.clamp(min=1)
        epoch_mean = torch.where(steps > 0, mean, torch.nan)
        self.criterion_epochs.copy_(torch.cat([self.criterion_epochs[1:], epoch_mean[None]]))
        length, epoch = self.restart_length(), self.current_epoch
        last = epoch + 1 >= self.trainer.max_epochs or self.trainer.should_stop
        if (epoch + 1) % length and not last:
            return
        restart = epoch // length
        score = self.criterion_epochs.nanmean()
        if (epoch + 1) % length and restart > 0:
            # Stopped inside this restart (trainer.max_time, early stopping) after one finished: a
            # restart cut short, its schedule unfinished, is not compared with the finished ones.
            self.log(f"train/restart{restart}/{self.restart_criterion}_cut_short", score)
            self.restart_cut_short = restart
            self._keep_best_restart()
            return
        self.restart_scores[restart] = score
        self.log(f"train/restart{restart}/{self.restart_criterion}", score)
        if self.selected_restart == restart:  # one read per restart
            self._best_restart = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        if last:
            self._keep_best_restart()
        else:
            self._begin_restart(restart + 1)

    def _begin_restart(self, restart: int) -> None:
        torch.manual_seed(derive_seed(_RESTART_STREAM, restart))  # the same draws on every rank
        self.reinitialise_(restart)
        self.criterion_epochs.fill_(float("nan"))
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()  # momentum buffers, Adam's moments: as a new optimizer has them
            for group in optimizer.param_groups:
                group["lr"] = group.get("initial_lr", group["lr"])
        if self.build_lr_scheduler is not None:
            for config in self.trainer.lr_scheduler_configs:
                config.scheduler = self.build_lr_scheduler(config.scheduler.optimizer)

    def _keep_best_restart(self) -> None:
        """Loads the kept restart's state, the bookkeeping of the whole run excepted."""
        if self._best_restart is None:
            return
        run = {k: v.clone() for k, v in self.state_dict().items() if k in _RUN_BUFFERS}
        self.load_state_dict({**self._best_restart, **run})

    @property
    def epoch_in_restart(self) -> int:
        """The epoch in progress, counted from its restart's first (the run's epoch without restarts)."""
        return self.current_epoch % self.restart_length() if self.restarts > 1 else self.current_epoch

    @property
    def selected_restart(self) -> int | None:
        """The restart kept (the lowest score so far); None without restarts or before one ended."""
        if self.restarts == 1 or torch.isnan(self.restart_scores).all():
            return None
        return int(torch.nan_to_num(self.restart_scores, nan=math.inf).argmin())

    def configure_optimizers(self):
        # Frozen parameters (a momentum encoder's) are not the optimizer's: no weight decay on them.
        optimizer = self.build_optimizer([p for p in self.parameters() if p.requires_grad])
        if self.build_lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.build_lr_scheduler(optimizer)}

    # -- evaluation and prediction ----------------------------------------------------------

    @torch.no_grad()
    def predict_proba(self, images: Tensor) -> Tensor:
        """Soft assignments of a batch of uint8 images (a single image too): num_heads x B x C."""
        return self.cluster_logits(self.plain(images)).float().softmax(-1)

    def combined_proba(self, probabilities: Tensor) -> Tensor:
        """The run's one assignment (B x C) of every head's (num_heads x B x C): the selected head's,
        or with combine_heads "vote" the mean over the heads, each head's cluster
        head_alignment[h, k] read as the selected head's cluster k."""
        if self.combine_heads == "select":
            return probabilities[self.selected_head]
        index = self.head_alignment.to(probabilities.device)[:, None, :].expand_as(probabilities)
        return probabilities.gather(-1, index).mean(0)

    @torch.no_grad()
    def assign(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Online prediction of uint8 images: the run's cluster (`combined_proba`) and its
        probability (B, B)."""
        if self.combine_heads == "vote":  # every head, each on the input it reads (DCCM's restarts)
            confidence, cluster = self.combined_proba(self.predict_proba(images)).max(-1)
            return cluster, confidence
        return self.assign_features(self.cluster_features(self.plain(images)))

    @torch.no_grad()
    def assign_features(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """`assign` of the features the cluster head reads (`cluster_features`), for a caller that
        holds them already (features embedded once by a frozen backbone, which every head reads)."""
        probabilities = self.cluster_head(features).float().softmax(-1)
        confidence, cluster = self.combined_proba(probabilities).max(-1)
        return cluster, confidence

    def evaluation_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """What the evaluation keeps of each sample, rows first: every head's cluster (B x heads; with
        combine_heads "vote", the vote's cluster as a last column); for a fitted head, the features
        it is fitted to."""
        if self.cluster_head.fitted:
            return {"features": self.cluster_features(self.plain(images))}
        probabilities = self.predict_proba(images)
        clusters = probabilities.argmax(-1).T
        if self.combine_heads == "vote":  # the vote's cluster: a last column
            clusters = torch.cat([clusters, self.combined_proba(probabilities).argmax(-1)[:, None]], 1)
        return {"cluster": clusters}

    def evaluation_clusters(self, outputs: dict[str, Tensor], stage: str) -> Tensor | None:
        """Every head's cluster of every evaluation sample (N x heads), from the outputs gathered to
        rank 0. Called on every process, with no outputs off rank 0 (it returns None there): a
        fitted head is fitted here, on the whole set (a broadcast every rank joins)."""
        if not self.cluster_head.fitted:
            return outputs.get("cluster")
        features = outputs.get("features")  # rank 0's
        self.cluster_head.fit(features)
        return None if features is None else self.cluster_head(features).argmax(-1).T

    def permute_clusters_(self, order: list[int] | Tensor) -> None:
        """Renumber the clusters in place: new cluster k is old cluster order[k]. After this,
        `predict` (and every other use of the checkpoint) names clusters the new way. A method
        whose state is indexed by cluster beyond its head renumbers that too (SCL's memory)."""
        index = torch.as_tensor(order, dtype=torch.long)
        if sorted(index.tolist()) != list(range(self.num_clusters)):
            raise ValueError(f"{index.tolist()} is not a permutation of the {self.num_clusters} clusters")
        self.cluster_head.permute_(index)
        if self.combine_heads == "vote":  # the selected head's cluster k is now its old order[k]
            inverse = index.argsort().to(self.head_alignment.device)
            self.head_alignment.copy_(inverse[self.head_alignment[:, index.to(inverse.device)]])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        with torch.no_grad():
            self._evaluation.add(
                batch["index"], label=batch["label"], **self.evaluation_outputs(batch["image"])
            )

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def _report(self, stage: str) -> None:
        """ACC / NMI / ARI of every head (labels only report), the selected head's cluster sizes
        and whether the clusters collapsed. The outputs are gathered to rank 0 only, which
        computes the figures; every process then holds and logs rank 0's (broadcast)."""
        if not self._evaluation:
            return
        outputs = self._evaluation.gather(rank0_only=True)  # empty off rank 0
        clusters = self.evaluation_clusters(outputs, stage)
        results = None
        if outputs:
            clusters, labels = clusters.cpu(), outputs["label"].cpu()
            voted = self.combine_heads == "vote" and not self.cluster_head.fitted
            heads = [evaluate(clusters[:, h], labels) for h in range(clusters.shape[1] - voted)]
            selected = self.selected_head
            final = clusters[:, -1] if voted else clusters[:, selected]  # the run's partition
            sizes = torch.bincount(final, minlength=self.num_clusters)[: self.num_clusters].tolist()
            results = {
                "heads": heads,
                "selected_head": selected,
                **(evaluate(final, labels) if voted else heads[selected]),
                **({"vote": True} if voted else {}),
                "cluster_sizes": sizes,
                "collapsed": collapsed(sizes),
            }
        self.eval_results = broadcast_object(results)
        heads, selected = self.eval_results["heads"], self.eval_results["selected_head"]
        for name in heads[selected]:
            value = self.eval_results[name]
            self.log(
                f"{stage}/{name}", value, prog_bar=name == "acc", sync_dist=True
            )  # the same on every rank
        if len(heads) > 1:
            for h, results in enumerate(heads):
                self.log_dict(
                    {f"{stage}/head{h}/{name}": value for name, value in results.items()}, sync_dist=True
                )

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Online prediction: the run's cluster (`assign`) and its probability."""
        cluster, confidence = self.assign(batch["image"])
        return {"index": batch["index"], "cluster": cluster, "confidence": confidence}

    # -- checkpoints ------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["clusterlab"] = {
            "method": type(self).__name__,
            "num_clusters": self.num_clusters,
            "input_shape": self.input_shape,
            "epochs_trained": int(self.epochs_trained),
            "version": __version__,
        }
        if self._best_restart is not None:  # the best restart so far: a resumed run can still keep it
            checkpoint["best_restart"] = self._best_restart

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's load, with weights that do not fit this model (another backbone, another number
        of heads) refused in one line that says which, instead of a list of every key."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            if "Error(s) in loading state_dict" not in str(error):
                raise
            details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
            first = details[0] if details else ""
            first = first if len(first) <= 200 else first[:200] + "..."
            where = getattr(self._trainer, "ckpt_path", None) if self._trainer else None
            raise CheckpointMismatchError(
                f"checkpoint{f' {where}' if where else ''}: its weights do not fit this config's "
                f"{type(self).__name__} ({len(details)} problem(s); first: {first}). Use the config the "
                "checkpoint was trained with (its run directory has config.yaml)."
            ) from None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        where = getattr(self._trainer, "ckpt_path", None) if self._trainer else None
        where = f" {where}" if where else ""
        meta = checkpoint.get("clusterlab")
        if meta is None:
            raise CheckpointMismatchError(
                f"checkpoint{where} was not written by clusterlab (no 'clusterlab' entry)"
            )
        if meta["method"] != type(self).__name__:
            raise CheckpointMismatchError(
                f"checkpoint{where} holds a {meta['method']} model; this run configures "
                f"{type(self).__name__}. "
                f"Use the config the checkpoint was trained with (its run directory has config.yaml)."
            )
        self.input_shape = meta.get("input_shape")
        self._best_restart = checkpoint.get("best_restart")
        if meta["num_clusters"] != self.num_clusters:
            raise CheckpointMismatchError(
                f"checkpoint{where} has {meta['num_clusters']} clusters; this run configures "
                f"{self.num_clusters}"
            )


_RESTART_STREAM = 0x2E57A27  # derive_seed stream of the restarts' initial weights
# The restarts' bookkeeping: not watched by the divergence guard (NaN until a restart is scored).
_RESTART_BUFFERS = ("restart_scores", "criterion_epochs", "criterion_sum", "criterion_steps")
# Buffers of the whole run, not of one restart: kept when the best restart's state is loaded.
_RUN_BUFFERS = ("epochs_trained", *_RESTART_BUFFERS)


def collapsed(sizes: list[int], largest_share: float = 0.9) -> bool:
    """Whether clusters collapsed, from their sizes alone (no label): the largest holds more than
    `largest_share` of the images, or fewer than half of the clusters hold any."""
    total = sum(sizes)
    if total == 0:
        return False
    return max(sizes) > largest_share * total or sum(s > 0 for s in sizes) < len(sizes) / 2


def match_clusters(agreement: Tensor) -> Tensor:
    """Each head's cluster matched to each reference cluster, from their co-assignment counts
    (heads x C x C: head's cluster, reference's), by the Hungarian method: heads x C, row h's
    entry k being head h's cluster matched to reference cluster k. No label involved."""
    alignment = torch.empty(agreement.shape[:2], dtype=torch.long)
    for h, counts in enumerate(agreement.cpu().double().numpy()):
        rows, cols = linear_sum_assignment(counts, maximize=True)
        alignment[h, torch.as_tensor(cols)] = torch.as_tensor(rows)
    return alignment

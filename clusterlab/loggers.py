"""Weights & Biases through Lightning's WandbLogger, offline unless the user is logged in."""

from __future__ import annotations

import netrc
import os
from urllib.parse import urlparse

from pytorch_lightning.loggers import WandbLogger as _WandbLogger


def wandb_logged_in() -> bool:
    """True when W&B has credentials (WANDB_API_KEY, or a netrc entry for its host); never prompts."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(_WandbLogger):
    """W&B logging that needs no network and never prompts.

    Args:
        project: W&B project.
        name: run name (default: the run directory's name).
        save_dir: where W&B writes its files (default: the run directory).
        offline: None (default): online if you are logged in, offline otherwise (sync later with
            `wandb sync <run dir>/wandb/offline-run-*`). WANDB_MODE, when set, wins.
        entity, group, tags: passed to wandb.init.
        log_model: upload checkpoints as artifacts (online only).
    """

    def __init__(
        self,
        project: str = "clusterlab",
        name: str | None = None,
        save_dir: str | None = None,
        offline: bool | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        log_model: bool = False,
    ) -> None:
        mode = os.environ.get("WANDB_MODE")
        if offline is None:
            offline = mode in ("offline", "dryrun") or (mode is None and not wandb_logged_in())
        super().__init__(project=project, name=name, save_dir=save_dir, offline=offline, entity=entity,
                         group=group, tags=tags, log_model=log_model and not offline, dir=save_dir,
                         settings=_quiet_settings())  # fmt: skip


def _quiet_settings():
    import wandb

    # No console capture (Lightning's rich output stays intact) and no git/system probing.
    return wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True)

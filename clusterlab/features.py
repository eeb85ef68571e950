"""Features computed once: a frozen backbone embeds a data set a single time, and every epoch after
that trains on the stored features (TEMI's heads; the folder command's pretrained route).

The features are cached on disk under a hash of what determines them, so that a second run (another
seed, more epochs, a resumed run) reads them back instead of embedding again:
- the backbone: its class, its configuration (`repr`) and every tensor of its state (weights and
  batch-norm statistics), so a changed weights file or pretext checkpoint is embedded again;
- the input transform (the method's plain views, by `repr`);
- the data: the images' shape, dtype and bytes.
The file is read weights-only (a planted pickle cannot run code); one that cannot be read, or
holds the wrong number of rows, is refused with its path, not silently replaced.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from clusterlab.distributed import broadcast, rank, read_on_rank0
from clusterlab.errors import CheckpointError
from clusterlab.passes import Step, pass_over
from clusterlab.runs import load_failure

# Where features are kept unless a run says otherwise: keyed by content, shared by every run that
# embeds the same images with the same weights (TEMI, the folder command's --backbone).
DEFAULT_CACHE = "~/.cache/clusterlab/features"


def digest(backbone: nn.Module, transform: nn.Module, images: Tensor) -> str:
    """The hash the features of `images` through `transform` then `backbone` are cached under."""
    h = hashlib.sha256()
    h.update(f"{type(backbone).__qualname__}\n{backbone!r}\n{transform!r}\n".encode())
    for name, value in sorted(backbone.state_dict().items()):
        value = value.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype}\n".encode())
        h.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    images = images.detach().cpu().contiguous()
    h.update(f"images:{tuple(images.shape)}:{images.dtype}\n".encode())
    h.update(images.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read(path: Path, num_images: int) -> Tensor:
    try:
        features = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every way a file can fail to be a tensor
        raise CheckpointError(
            f"the feature cache {path} cannot be read ({load_failure(error)}); delete it to embed again"
        ) from None
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] != num_images:
        raise CheckpointError(
            f"the feature cache {path} is not a table of {num_images} rows; delete it to embed again"
        )
    return features


def cache_file(cache_dir: str | Path | None, key: str) -> Path | None:
    """Where `embed_once` keeps the features under `key` in `cache_dir` (None: not stored)."""
    return Path(cache_dir).expanduser() / f"features-{key[:24]}.pt" if cache_dir is not None else None


def embed_once(
    module: nn.Module,
    loader,
    step: Step,
    key: str,
    num_images: int,
    cache_dir: str | Path | None,
    description: str = "Embedding",
) -> tuple[Tensor, Path | None]:
    """Every sample's features (N x D, float32, in dataset order, on every process) and the file
    they are stored in (None: not stored): read from
    `cache_dir`/features-<key>.pt when there, otherwise `step(batch)["features"]` over `loader` (each
    process its shard, `clusterlab.passes.pass_over`), gathered to every rank and written there by
    rank 0. `cache_dir` None: computed, not stored. `key`: `digest(...)` of what determines them."""
    device = next(module.parameters()).device
    path = cache_file(cache_dir, key)
    features, found = read_on_rank0(path, lambda p: _read(p, num_images), "the feature cache", device)
    if found:
        width = int(broadcast(torch.tensor(features.shape[1] if features is not None else 0, device=device)))
        table = features.to(device) if features is not None else torch.empty(num_images, width, device=device)
        rank_zero_info(f"features of {num_images:,} images from the cache {path}")
        return broadcast(table).cpu(), path
    features = pass_over(module, loader, step, description=description)["features"].float().cpu()
    if rank() == 0 and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save(features, partial)
        partial.replace(path)  # whole or absent: a killed run leaves no half-written cache
        rank_zero_info(f"embedded {num_images:,} images once, cached in {path}")
    return features, path

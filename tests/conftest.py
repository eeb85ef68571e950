import os
import warnings

import pytest
import torch

from clusterlab.data.views import SmallImageViews
from clusterlab.methods import SimCLR
from tests.helpers import save_pretext, tiny_cnn

# Tests never reach W&B's servers; the one W&B test turns offline mode on explicitly.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.pop("WANDB_API_KEY", None)
warnings.filterwarnings("ignore", message=".*Sparse invariant checks.*")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run inside an empty directory (runs/ lands there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def pretext(tmp_path):
    torch.manual_seed(0)
    return save_pretext(SimCLR(10, tiny_cnn(), SmallImageViews()), tmp_path / "pretext.ckpt")

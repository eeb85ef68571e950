"""A killed and resumed SCL run continues identically: encoder, momentum encoder, semantic memory,
pseudo labels and label-change counts all come back from the checkpoint."""


from tests.helpers import kill_and_resume

# SCL on digits, small enough for a test: 8/16-channel CNN, 3 batches of 64 per epoch, queues that
# wrap around within an epoch.
TINY_SCL = """
seed_everything: 3
trainer:
  max_epochs: 4
  limit_train_batches: 3
  check_val_every_n_epoch: 1
  num_sanity_val_steps: 0
  enable_model_summary: false
  logger:
  - class_path: clusterlab.loggers.CSVLogger
model:
  class_path: clusterlab.methods.SCL
  init_args:
    backbone:
      class_path: clusterlab.nn.SmallCNN
      init_args: {in_channels: 1, widths: [8, 16], downsample: [false, true]}
    views:
      class_path: clusterlab.data.views.SmallImageViews
    memory_size: 90
    optimizer:
      class_path: torch.optim.SGD
      init_args: {lr: 0.03, momentum: 0.9, weight_decay: 0.0005}
    lr_scheduler:
      class_path: torch.optim.lr_scheduler.CosineAnnealingLR
      init_args: {T_max: 4}
data:
  dataset: digits
  batch_size: 64
kmeans_baseline: false
"""


def test_killed_and_resumed_scl_run_continues_with_the_same_state(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_SCL)
    expected, saved, got = kill_and_resume(tmp_path, "tiny.yaml")  # killed mid-epoch 2, after its refresh
    # The checkpoint of epoch 1 already held the state SCL carries between epochs.
    assert int(saved["state_dict"]["sample_table.epoch"]) == 1 and saved["state_dict"]["sample_table.changes"].any()
    assert (saved["state_dict"]["semantic_memory.clustering.index"] >= 0).any()
    names = set(expected["state_dict"])
    for part in ("backbone.", "momentum_encoder.", "semantic_memory.", "sample_table.", "classifiers."):
        assert any(n.startswith(part) for n in names), part
    assert int(got["state_dict"]["sample_table.epoch"]) == 3

"""Numbers and settings that cannot work, refused when the config is parsed, before any run folder
is made or any data is read: one line that names the option, the value and what would work.

`clusterlab fit / validate / test / predict` call `check_config` on the parsed config; the data
module calls `check_data_arguments` itself, so that it refuses the same values when it is built in
Python. A value given on the command line either takes effect or is refused here: nothing is dropped
without a word (the number of clusters and the input channels are set on the data, and the model
takes them from there). A key that no class of the config has is explained by
`explain_config_error`: which key, of which class, and the option that was probably meant.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys

from pytorch_lightning.cli import LightningArgumentParser

from clusterlab.errors import ConfigError

MIN_IMAGE_SIZE = 8  # the smallest input of any backbone here (8x8 digits)


def check_data_arguments(
    dataset: str,
    batch_size: int,
    eval_batch_size: int,
    num_workers: int,
    num_clusters: int | None,
    image_size: int | None,
    channels: int | None,
    stream: bool,
    max_pixels: int | None = None,
) -> None:
    """The data module's numbers and the options that only one kind of data set reads."""
    if batch_size < 2:
        raise ConfigError(
            f"--data.batch_size {batch_size}: every method contrasts the images of a batch; give at least 2"
        )
    if eval_batch_size < 1:
        raise ConfigError(f"--data.eval_batch_size {eval_batch_size}: give at least 1")
    if num_workers < 0:
        raise ConfigError(f"--data.num_workers {num_workers}: give 0 (no workers) or more")
    if num_clusters is not None and num_clusters < 2:
        raise ConfigError(f"--data.num_clusters {num_clusters}: clustering needs at least 2 clusters")
    folder_only = {"image_size": image_size, "channels": channels, "stream": stream or None}
    folder_only["max_pixels"] = max_pixels
    given = [f"--data.{name} {value}" for name, value in folder_only.items() if value is not None]
    if dataset != "image_folder" and given:
        them = "it" if len(given) == 1 else "them"
        raise ConfigError(
            f"{', '.join(given)}: only --data.dataset image_folder reads {them}; the {dataset} images have "
            f"one size and number of channels. Leave {them} out"
        )
    if image_size is not None and image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"--data.image_size {image_size}: use at least {MIN_IMAGE_SIZE} pixels")
    if max_pixels is not None and max_pixels < (image_size or MIN_IMAGE_SIZE) ** 2:
        raise ConfigError(
            f"--data.max_pixels {max_pixels}: every image would be skipped; give at least "
            f"{(image_size or MIN_IMAGE_SIZE) ** 2:,} (the default: no option, 120 megapixels)"
        )


def _check_trainer(trainer) -> None:
    """The Trainer's counts, which Lightning would otherwise refuse deep inside its constructor."""
    counts = {
        "max_epochs": (trainer.get("max_epochs"), -1, "a number of epochs >= 0, or -1 for no limit"),
        "min_epochs": (trainer.get("min_epochs"), 0, "0 or more epochs"),
        "max_steps": (trainer.get("max_steps"), -1, "a number of steps >= 0, or -1 for no limit"),
        "min_steps": (trainer.get("min_steps"), 0, "0 or more steps"),
        "check_val_every_n_epoch": (trainer.get("check_val_every_n_epoch"), 1, "1 or more epochs"),
        "log_every_n_steps": (trainer.get("log_every_n_steps"), 1, "1 or more steps"),
        "accumulate_grad_batches": (trainer.get("accumulate_grad_batches"), 1, "1 or more batches"),
    }
    for name, (value, lowest, what) in counts.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < lowest:
            raise ConfigError(f"--trainer.{name} {value}: give {what}")
    for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
        value = trainer.get(name)
        if isinstance(value, float) and not 0.0 <= value <= 1.0 or isinstance(value, int) and value < 0:
            raise ConfigError(
                f"--trainer.{name} {value}: give a fraction of the batches (0.0 to 1.0) or a number "
                "of them (>= 0)"
            )


def _check_links(config) -> None:
    """The model's number of clusters and its backbone's input channels come from the data (the CLI
    links them): a value given for the model takes effect through the data, or is refused when the
    data says otherwise."""
    model = config.model.get("init_args") or {}
    given = model.get("num_clusters")
    if given is not None:
        if config.data.num_clusters is None:
            config.data.num_clusters = given  # one source of truth: the data, which the model reads
        elif config.data.num_clusters != given:
            raise ConfigError(
                f"--model.init_args.num_clusters {given} and --data.num_clusters {config.data.num_clusters} "
                "disagree: the model takes its number of clusters from the data; set --data.num_clusters only"
            )
    backbone = model.get("backbone") or {}
    channels = (backbone.get("init_args") or {}).get("in_channels")
    # The parser fills in the backbone's default in_channels: only another value was given.
    if channels is not None and channels != _default(backbone.get("class_path"), "in_channels"):
        from clusterlab.data.sources import SOURCES

        folder = config.data.dataset == "image_folder"
        data_channels = config.data.channels if folder else SOURCES[config.data.dataset].channels
        if data_channels is not None and channels != data_channels:  # a folder's: maybe the checkpoint's
            raise ConfigError(
                f"--model.init_args.backbone.init_args.in_channels {channels}: the {config.data.dataset} "
                f"images have {data_channels} channel(s), and the backbone takes its input channels from the "
                "data (--data.channels for image_folder); leave in_channels out"
            )


def class_signature(class_path: str | None) -> inspect.Signature | None:
    """The constructor signature of the class at `class_path` (None when it cannot be imported)."""
    try:
        module, _, attribute = str(class_path).rpartition(".")
        return inspect.signature(getattr(importlib.import_module(module), attribute))
    except (ImportError, AttributeError, ValueError, TypeError):
        return None


def _default(class_path: str | None, name: str):
    """The default of parameter `name` of the class at `class_path` (None when there is none)."""
    signature = class_signature(class_path)
    parameter = signature.parameters.get(name) if signature else None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def check_config(config) -> None:
    """Every check above on a parsed `clusterlab` config (one subcommand's)."""
    data = config.data
    check_data_arguments(
        data.dataset,
        data.batch_size,
        data.eval_batch_size,
        data.num_workers,
        data.num_clusters,
        data.image_size,
        data.channels,
        data.stream,
        data.get("max_pixels"),
    )
    _check_trainer(config.trainer)
    _check_links(config)
    minutes = config.get("checkpoint_every_minutes")
    if minutes is not None and not minutes > 0:
        raise ConfigError(f"--checkpoint_every_minutes {minutes:g}: give a number of minutes above 0")


def check_checkpoint_model(hparams: dict, model: dict, path: str) -> None:
    """A checkpoint rebuilds the model it was trained with (LightningCLI reads its hyper-parameters
    over the config's `model`), so a model setting of the config that differs from the checkpoint's
    would be dropped without a word: refuse it instead, naming the first such setting."""
    recorded = {k: v for k, v in hparams.items() if not k.startswith("_") and k != "num_clusters"}
    differs = _first_difference(recorded, model.get("init_args") or {}, "model.init_args")
    if differs is not None:
        key, trained, asked = differs
        raise ConfigError(
            f"--{key} {_show(asked)}: the checkpoint {path} was trained with {_show(trained)}, and a "
            "checkpoint rebuilds the model it was trained with, so this value would be ignored. Use the "
            "config it was trained with (its run directory has config.yaml), or fit a new run"
        )


def _first_difference(trained, asked, key: str):
    """(dotted key, trained value, asked value) of the first setting in both that differs, or None.
    A setting in only one of them is no difference (the config's dump leaves out unset values)."""
    if isinstance(trained, dict) and isinstance(asked, dict):
        for name in trained:
            if name in asked:
                found = _first_difference(trained[name], asked[name], f"{key}.{name}")
                if found is not None:
                    return found
        return None
    if isinstance(trained, (list, tuple)) and isinstance(asked, (list, tuple)):
        same = len(trained) == len(asked) and all(
            _first_difference(a, b, key) is None for a, b in zip(trained, asked)
        )
        return None if same else (key, trained, asked)
    if trained == asked:  # also 1 == 1.0
        return None
    return key, trained, asked


def _show(value) -> str:
    if isinstance(value, dict) and "class_path" in value:
        return str(value["class_path"]) + (" with other arguments" if value.get("init_args") else "")
    return str(value)


def explain_config_error(message: str, known_keys: list[str]) -> str:
    """Turn jsonargparse's nested report of a bad key into: which key, of which class, what was meant."""
    unknown = re.search(r"Option '([^']+)' is not accepted", message)
    if unknown:
        before = message[: unknown.start()]
        option, keys = unknown.group(1), re.findall(r'Parser key "([^"]+)"', before)
        owner = (re.findall(r"class_path '([^']+)'", before) or [None])[-1]
        key = ".init_args.".join([*keys, option])
        accepted = _init_parameters(owner) if owner else []
        hint = difflib.get_close_matches(option, accepted, 1)
        return (
            f"unknown config key '{key}': {owner} has no option '{option}'."
            + (f" Did you mean '{hint[0]}'?" if hint else "")
            + (f" Its options: {', '.join(accepted)}." if accepted else "")
        )
    for pattern in (r"does not accept option '([^']+)'", r"unrecognized arguments: --([^\s=]+)"):
        found = re.search(pattern, message)
        if found:
            key = found.group(1)
            hint = difflib.get_close_matches(key, known_keys, 1, cutoff=0.75)
            return f"unknown config key '{key}'." + (f" Did you mean '{hint[0]}'?" if hint else "")
    return message


def _init_parameters(class_path: str) -> list[str]:
    signature = class_signature(class_path)
    return [p for p in signature.parameters if p not in ("self", "args", "kwargs")] if signature else []


class ClusterLabParser(LightningArgumentParser):
    """Says what is wrong with a config in one message, without the usage dump."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        known = [a.dest for a in parser._actions if a.dest and a.dest != "help"]
        sys.stderr.write(
            f"{prog}: error: {explain_config_error(message, known)}\n(all options: {prog} --help)\n"
        )
        sys.exit(2)

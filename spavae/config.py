"""Experiment configuration: one JSON (or YAML) file describing data, model, optimiser, scheduler and trainer.

Every section is a dataclass whose fields carry their default (the original spaVAE's, ALGORITHM 8.5) and a
one-line meaning (``metadata['help']``). :func:`load_config` validates a file: an unknown key, a value of the wrong
type or an impossible value raises :class:`ConfigError` naming the key path, e.g. ``model.kernel``. Keys that start
with an underscore (``"_comment"``) are ignored, so JSON files can carry comments.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spavae.utils import atomic_path

Check = Callable[[Any], "str | None"]


class ConfigError(ValueError):
    """An invalid experiment configuration; the message starts with the key path."""


def _opt(default: Any, help: str, check: Check | None = None) -> Any:
    """A config field with its default, its meaning and an optional value check (returns an error or None)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata={"help": help, "check": check})
    return field(default=default, metadata={"help": help, "check": check})


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help, "check": None})


def _positive(value) -> str | None:
    return None if value is None or value > 0 else "must be > 0"


def _non_negative(value) -> str | None:
    return None if value is None or value >= 0 else "must be >= 0"


def _at_least(bound: int) -> Check:
    return lambda value: None if value is None or value >= bound else f"must be >= {bound}"


def _open_unit(value) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _proper_fraction(value) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _layers(value) -> str | None:
    return None if all(width >= 1 for width in value) else "every layer width must be >= 1"


def _folder_name(value) -> str | None:
    return None if value and value not in (".", "..") and not set(value) & set("/\\") else \
        "must be a plain folder name (no path separators)"


@dataclass
class DataConfig:
    """Where the spots come from and which of them are held out for testing."""

    path: str | None = _opt(None, "spaVAE-layout .h5 (X, pos[, Y]) or .h5ad file; relative paths are read from the "
                                  "current directory. `spavae train --data PATH` overrides it.")
    layer: str | None = _opt(None, ".h5ad only: layer with the raw counts (null = .X)")
    spatial_key: str = _opt("spatial", ".h5ad only: obsm key of the spot coordinates")
    label_key: str | None = _opt(None, ".h5ad only: obs column with ground-truth labels ('NA' = unlabelled)")
    test_size: float = _opt(0.0, "fraction of spots held out of training as a test set (0 = none); evaluation "
                                 "scores them separately", _proper_fraction)
    test_seed: int = _opt(0, "seed of the test-set draw (fixed across training seeds)", _non_negative)


@dataclass
class BetaConfig:
    """The KL weight and its PI controller (ALGORITHM 5)."""

    init: float = _opt(10.0, "initial (or, with dynamic false, fixed) KL weight", _positive)
    dynamic: bool = _opt(True, "steer beta with the PI controller toward kl_target")
    min: float = _opt(4.0, "lower bound of the controlled beta", _positive)
    max: float = _opt(25.0, "upper bound of the controlled beta", _positive)
    kl_target: float = _opt(0.025, "target KL per spot and latent dimension (times n_gp + n_gauss)", _positive)


@dataclass
class ModelConfig:
    """Architecture, GP prior and loss options (the arguments of :class:`spavae.SpaVAE`)."""

    n_gp: int = _opt(2, "latent dimensions with the GP prior over spot locations", _at_least(1))
    n_gauss: int = _opt(8, "latent dimensions with a standard-normal prior", _non_negative)
    encoder: Literal["dense", "conv"] = _opt("dense", "'dense' MLP encoder, or 'conv': Conv1d(1->2, k=5) + "
                                                      "MaxPool(2) over the genes before the dense layers")
    encoder_layers: list[int] = _opt([128, 64], "hidden widths of the encoder", _layers)
    decoder_layers: list[int] = _opt([128], "hidden widths of the decoder ([] = linear decoder)", _layers)
    dropout: float = _opt(0.0, "dropout rate of both networks", _proper_fraction)
    kernel: Literal["cauchy", "eq"] = _opt("cauchy", "GP kernel: Cauchy 1/(1 + d^2/s) or EQ exp(-d^2/s)")
    kernel_scale: float = _opt(20.0, "initial (or fixed) kernel scale s", _positive)
    fix_kernel_scale: bool = _opt(False, "keep the kernel scale fixed instead of learning it")
    inducing: Literal["grid", "kmeans"] = _opt("grid", "inducing points on a regular grid or at k-means centroids")
    inducing_steps: int = _opt(6, "grid inducing points: (steps + 1)^2 points", _at_least(1))
    n_inducing: int | None = _opt(None, "k-means inducing points: number of centroids (null = 49)", _at_least(2))
    learn_inducing: bool = _opt(False, "train the inducing locations (fixed in the original)")
    loc_range: float = _opt(20.0, "size of the location frame: a square section spans [0, loc_range]^2", _positive)
    location_frame: Literal["aligned", "minmax"] = _opt(
        "aligned", "aligned: principal axes where their variances differ 2-fold or more (else the input axes), "
                   "aspect kept, isotropic scale from the covariance (tissue area loc_range^2; unit free); minmax: "
                   "each axis scaled to [0, loc_range] (the original)")
    gp_n_obs: Literal["all", "train"] = _opt("all", "N of the N/b GP rescaling: all spots (original) or the "
                                                    "training split")
    dtype: Literal["float32", "float64"] = _opt("float32", "dtype of the networks (the GP algebra is float64)")
    noise: float = _opt(0.0, "standard deviation of the denoising-noise regulariser (0 = off)", _non_negative)
    num_samples: int = _opt(1, "latent samples per spot for the NB term", _at_least(1))
    beta: BetaConfig = _section(BetaConfig, "the KL weight")


@dataclass
class OptimizerConfig:
    """The optimiser (AdamW over every trainable parameter, as in the original)."""

    type: Literal["adamw"] = _opt("adamw", "optimiser (only AdamW)")
    lr: float = _opt(1e-3, "learning rate", _positive)
    weight_decay: float = _opt(1e-6, "AdamW weight decay", _non_negative)


@dataclass
class SchedulerConfig:
    """Learning-rate schedule on the monitored loss (validation loss, or training loss without validation)."""

    type: Literal["none", "plateau"] = _opt("none", "'none' (the original: constant lr) or 'plateau' "
                                                    "(ReduceLROnPlateau)")
    factor: float = _opt(0.75, "plateau: multiply the lr by this factor", lambda v: None if 0 < v < 1
                         else "must be in (0, 1)")
    patience: int = _opt(15, "plateau: epochs without improvement before lowering the lr", _non_negative)
    min_lr: float = _opt(0.0, "plateau: lower bound of the lr", _non_negative)


@dataclass
class TrainerConfig:
    """The training loop, checkpoints and the machine."""

    max_epochs: int = _opt(5000, "maximum number of epochs", _at_least(1))
    train_size: float = _opt(0.95, "fraction of the training spots used for training; the rest is the validation "
                                   "set for early stopping (1 = no validation)", _open_unit)
    patience: int = _opt(200, "early stopping: epochs without a better validation loss; the best weights are "
                              "restored", _at_least(1))
    batch_size: int | Literal["auto"] = _opt("auto", "mini-batch size, or 'auto' (128/256/512 by number of spots)",
                                             lambda v: None if v == "auto" or v >= 2 else "must be >= 2 or 'auto'")
    checkpoint_every: int = _opt(50, "write checkpoint-epoch<N>.pth every this many epochs (and at the end)",
                                 _at_least(1))
    keep_checkpoints: int | None = _opt(None, "keep only the newest this many checkpoint-epoch files (null = all)",
                                        _at_least(1))
    seed: int = _opt(0, "seed of weights, validation split, shuffling, sampling and KMeans", _non_negative)
    device: str = _opt("auto", "'auto' (CUDA when available), 'cpu' or 'cuda[:i]'",
                       lambda v: None if v == "auto" or v == "cpu" or v.startswith("cuda") else
                       "must be 'auto', 'cpu' or 'cuda[:i]'")
    threads: int | None = _opt(None, "torch CPU threads (null = torch's choice)", _at_least(1))
    progress: bool = _opt(True, "show a progress bar")


@dataclass
class EvaluationConfig:
    """What `spavae evaluate` computes and draws."""

    n_domains: int | None = _opt(None, "KMeans clusters (null = number of distinct non-NA ground-truth labels)",
                                 _at_least(1))
    kmeans_n_init: int = _opt(100, "KMeans restarts", _at_least(1))
    refine: Literal["hexagon", "square"] | None = _opt("hexagon", "neighbour-majority refinement of the domains: "
                                                                  "'hexagon' (Visium), 'square' (ST) or null")
    lattice: Literal["xy", "visium_array"] = _opt("xy", "coordinates are plain x/y, or Visium (array_row, "
                                                        "array_col), converted to a hexagonal lattice for "
                                                        "refinement and plots")
    knn_neighbors: int = _opt(11, "k of the k-NN layer classifier scored on the test spots", _at_least(1))
    marker_genes: list[str] | None = _opt(None, "genes drawn raw vs denoised (null = the n_marker_genes genes "
                                                "that best separate the found domains)")
    n_marker_genes: int = _opt(4, "number of automatically chosen marker genes", _at_least(1))
    denoise_samples: int = _opt(25, "latent draws averaged for the denoised counts", _at_least(1))
    umap: bool = _opt(True, "draw a UMAP of the latent")


@dataclass
class ExperimentConfig:
    """A whole experiment: the run lands in ``<save_dir>/<name>/``."""

    name: str = _opt("spavae", "run name: the folder under save_dir", _folder_name)
    save_dir: str = _opt("experiments", "folder that holds the runs (relative to the current directory)")
    data: DataConfig = _section(DataConfig, "input data")
    model: ModelConfig = _section(ModelConfig, "model")
    optimizer: OptimizerConfig = _section(OptimizerConfig, "optimiser")
    scheduler: SchedulerConfig = _section(SchedulerConfig, "learning-rate scheduler")
    trainer: TrainerConfig = _section(TrainerConfig, "training loop")
    evaluation: EvaluationConfig = _section(EvaluationConfig, "evaluation")

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        """Plain nested dict (JSON-ready)."""
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as indented JSON (atomically)."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def model_kwargs(self) -> dict:
        """Keyword arguments of :class:`spavae.SpaVAE`."""
        m = self.model
        return {"n_gp": m.n_gp, "n_gauss": m.n_gauss, "encoder": m.encoder, "encoder_layers": tuple(m.encoder_layers),
                "decoder_layers": tuple(m.decoder_layers), "kernel": m.kernel, "kernel_scale": m.kernel_scale,
                "fix_kernel_scale": m.fix_kernel_scale, "inducing": m.inducing, "inducing_steps": m.inducing_steps,
                "n_inducing": m.n_inducing, "learn_inducing": m.learn_inducing, "loc_range": m.loc_range,
                "location_frame": m.location_frame,
                "dropout": m.dropout, "gp_n_obs": m.gp_n_obs, "dtype": m.dtype, "device": self.trainer.device,
                "seed": self.trainer.seed}

    def train_kwargs(self) -> dict:
        """Keyword arguments of :meth:`spavae.SpaVAE.train`."""
        t, m, s = self.trainer, self.model, self.scheduler
        return {"max_epochs": t.max_epochs, "lr": self.optimizer.lr, "weight_decay": self.optimizer.weight_decay,
                "batch_size": t.batch_size, "train_size": t.train_size, "patience": t.patience,
                "beta": m.beta.init, "dynamic_beta": m.beta.dynamic, "beta_min": m.beta.min, "beta_max": m.beta.max,
                "kl_target": m.beta.kl_target, "num_samples": m.num_samples, "noise": m.noise,
                "progress": t.progress,
                "lr_scheduler": None if s.type == "none" else {"factor": s.factor, "patience": s.patience,
                                                               "min_lr": s.min_lr}}


# ---------------------------------------------------------------------- validation
def config_from_dict(raw: dict) -> ExperimentConfig:
    """Validate a nested dict into an :class:`ExperimentConfig` (raises :class:`ConfigError`)."""
    config = _build(ExperimentConfig, raw, "")
    _check_together(config)
    return config


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read and validate a ``.json`` (or, with PyYAML installed, ``.yaml``/``.yml``) experiment config.

    Parameters
    ----------
    path
        The config file.
    overrides
        ``KEY.PATH=VALUE`` strings applied before validation; VALUE is read as JSON, else taken as a string
        (``trainer.seed=1``, ``name=run1``, ``model.encoder_layers=[64,32]``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path}: no such file")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:  # pragma: no cover - PyYAML ships with the pinned environment
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use JSON") from err
        raw = yaml.safe_load(text)
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be an object with the sections {_field_names(ExperimentConfig)}")
    for item in overrides:
        set_key(raw, item)
    return config_from_dict(raw)


def set_key(raw: dict, assignment: str) -> None:
    """Apply one ``KEY.PATH=VALUE`` override to a raw config dict (in place)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r}: expected KEY.PATH=VALUE, e.g. trainer.seed=1")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part} is not a section")
    node[leaf] = value


def _field_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _build(cls: type, raw: Any, prefix: str):
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a section (an object with keys {_field_names(cls)}), got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if not isinstance(key, str) or (key not in fields and not key.startswith("_")):
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, spec in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], raw[name], key + ".")
            continue
        value = _coerce(raw[name], hints[name], key)
        check = spec.metadata.get("check")
        problem = check(value) if check is not None and value is not None else None
        if problem:
            raise ConfigError(f"{key}: {problem}, got {raw[name]!r}")
        values[name] = value
    return cls(**values)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` checked against (and, for floats, converted to) the annotation; a ConfigError otherwise."""
    for arm in _arms(annotation):
        converted = _match(value, arm)
        if converted is not _NO_MATCH:
            return converted
    raise ConfigError(f"{key}: expected {' or '.join(_describe(arm) for arm in _arms(annotation))}, got {value!r}")


_NO_MATCH = object()


def _arms(annotation: Any) -> Iterator[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arm in typing.get_args(annotation):
            yield from _arms(arm)
    else:
        yield annotation


def _match(value: Any, arm: Any) -> Any:
    origin = typing.get_origin(arm)
    if arm is type(None):
        return None if value is None else _NO_MATCH
    if origin is Literal:
        return value if isinstance(value, str) and value in typing.get_args(arm) else _NO_MATCH
    if origin is list:
        (item,) = typing.get_args(arm)
        if not isinstance(value, (list, tuple)):
            return _NO_MATCH
        items = [_match(v, item) for v in value]
        return _NO_MATCH if any(v is _NO_MATCH for v in items) else items
    if arm is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if arm is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if arm is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else _NO_MATCH
    if arm is str:
        return value if isinstance(value, str) else _NO_MATCH
    raise TypeError(f"unsupported config annotation {arm!r}")  # a programming error in this module


_PLURAL = {int: "integers", str: "strings"}


def _describe(arm: Any) -> str:
    if arm is type(None):
        return "null"
    if typing.get_origin(arm) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(arm))
    if typing.get_origin(arm) is list:
        return f"a list of {_PLURAL[typing.get_args(arm)[0]]}"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}[arm]


def _check_together(config: ExperimentConfig) -> None:
    """Checks that involve more than one key."""
    beta = config.model.beta
    if beta.min > beta.max:
        raise ConfigError(f"model.beta.min: must not exceed model.beta.max ({beta.min} > {beta.max})")
    if config.model.n_inducing is not None and config.model.inducing != "kmeans":
        raise ConfigError("model.n_inducing: only used with model.inducing = 'kmeans' (the grid size comes from "
                          "model.inducing_steps)")
    if config.evaluation.marker_genes is not None and not config.evaluation.marker_genes:
        raise ConfigError("evaluation.marker_genes: give at least one gene, or null to choose them automatically")


# ---------------------------------------------------------------------- documentation
def config_reference() -> list[tuple[str, str, str]]:
    """``(key path, default as JSON, meaning)`` of every config key, sections first-to-last (for the docs)."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[spec.name]):
                walk(hints[spec.name], f"{prefix}{spec.name}.")
            else:
                default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
                rows.append((prefix + spec.name, json.dumps(default), spec.metadata["help"]))

    walk(ExperimentConfig, "")
    return rows

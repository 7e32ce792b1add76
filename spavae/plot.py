"""Plots: spatial domains next to the ground truth, and training curves."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from spavae.utils import atomic_path  # noqa: E402


def _scatter(ax, locations: np.ndarray, labels, title: str, size: float) -> None:
    labels = pd.Categorical(np.asarray(labels).astype(str))
    cmap = plt.get_cmap("tab10" if len(labels.categories) <= 10 else "tab20")
    for code, name in enumerate(labels.categories):
        keep = labels.codes == code
        color = "lightgrey" if name == "NA" else cmap(code % cmap.N)
        ax.scatter(locations[keep, 0], locations[keep, 1], s=size, color=color, label=name, linewidths=0)
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_xticks([]), ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2, frameon=False)


def plot_spatial_domains(locations: np.ndarray, domains, path: str | os.PathLike, *, truth=None,
                         title: str = "spavae domains") -> None:
    """Save a PNG of the found domains at the spot locations, next to the ground truth when given."""
    locations = np.asarray(locations, dtype=float)
    panels = [(domains, title)] + ([(truth, "ground truth")] if truth is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    size = max(2.0, 12000.0 / len(locations))
    for ax, (labels, name) in zip(axes[0], panels):
        _scatter(ax, locations, labels, name, size)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_training_curves(history: pd.DataFrame, path: str | os.PathLike) -> None:
    """Save a PNG of the per-spot training/validation loss, the NB term and beta over epochs."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for key, ax, name in (("loss", axes[0], "loss per spot"), ("nb", axes[1], "NB per spot")):
        for split in ("train", "val"):
            if f"{split}_{key}" in history:
                ax.plot(history["epoch"], history[f"{split}_{key}"], label=split)
        ax.set_title(name), ax.set_xlabel("epoch"), ax.legend()
    axes[2].plot(history["epoch"], history["beta"])
    axes[2].set_title("beta"), axes[2].set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

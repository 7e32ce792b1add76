"""Plots: spatial domains next to the ground truth or over the tissue image, and training curves."""

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
    _save(fig, path, dpi=120)


def plot_domains_on_image(image: np.ndarray, pixels: np.ndarray, domains, path: str | os.PathLike, *,
                          spot_diameter_px: float | None = None, title: str = "spavae domains") -> None:
    """Save a PNG of the tissue image beside the same image with the spots coloured by domain.

    Parameters
    ----------
    image
        RGB(A) image (floats in [0, 1] or unsigned integers), e.g. ``uns['spatial'][library]['images']['lowres']``.
    pixels
        ``n x 2`` spot positions (x, y) in the image's pixels (full-resolution positions times its scale factor).
    domains
        Domain of each spot.
    path
        Where to write the PNG.
    spot_diameter_px
        Spot diameter in the image's pixels (sets the marker size; default from the spot spacing).
    title
        Title of the right panel.
    """
    pixels = np.asarray(pixels, dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax in axes:
        ax.imshow(image)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0].set_title("tissue image")
    left, right = pixels.min(0), pixels.max(0)
    margin = 0.05 * (right - left).max()
    for ax in axes:
        ax.set_xlim(left[0] - margin, right[0] + margin)
        ax.set_ylim(right[1] + margin, left[1] - margin)
    # marker area in points^2 from the spot's diameter in pixels at the axes' scale
    width_px = (right - left).max() + 2 * margin
    diameter = spot_diameter_px or 0.6 * np.sqrt((right - left).prod() / max(len(pixels), 1))
    points = diameter / width_px * axes[1].get_position().width * fig.get_size_inches()[0] * 72
    _scatter(axes[1], pixels, domains, title, max(1.0, points ** 2))
    axes[1].invert_yaxis()  # _scatter flips y; the image axes are already flipped
    _save(fig, path, dpi=120)


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
    _save(fig, path)


def _save(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """Write ``fig`` as a PNG atomically and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def _value_panel(fig, ax, locations: np.ndarray, values: np.ndarray, title: str, size: float, *,
                 log: bool = True) -> None:
    """One panel of a value (``log1p`` by default) coloured at the spot locations, with a colour bar."""
    points = ax.scatter(locations[:, 0], locations[:, 1], c=np.log1p(values) if log else values, s=size,
                        cmap="viridis", linewidths=0)
    fig.colorbar(points, ax=ax, shrink=0.7, label="log1p" if log else None)
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal"), ax.invert_yaxis(), ax.set_xticks([]), ax.set_yticks([])


def plot_embedding(embedding: np.ndarray, labels, path: str | os.PathLike, *, title: str = "latent UMAP") -> None:
    """Save a PNG of a 2-D embedding (e.g. ``obsm['X_umap']`` from :func:`spavae.analysis.umap`) coloured by labels.

    ``'NA'`` labels are drawn in light grey.
    """
    embedding = np.asarray(embedding, dtype=float)
    if embedding.ndim != 2 or embedding.shape[1] != 2:
        raise ValueError(f"embedding must be n x 2, got shape {embedding.shape}")
    fig, ax = plt.subplots(figsize=(6.0, 4.8))
    _scatter(ax, embedding, labels, title, max(2.0, 8000.0 / len(embedding)))
    ax.invert_yaxis()  # _scatter flips y for tissue images; an embedding keeps its orientation
    ax.set_aspect("auto")
    _save(fig, path)


def plot_marker_genes(locations: np.ndarray, raw: np.ndarray, denoised: np.ndarray, genes, path: str | os.PathLike,
                      *, titles: tuple[str, str] = ("raw", "denoised")) -> None:
    """Save a PNG with one column per gene: ``log1p`` of the raw (top) and denoised (bottom) values at the spots.

    Parameters
    ----------
    locations
        ``n x 2`` spot coordinates.
    raw, denoised
        ``n x len(genes)`` values on the same scale (e.g. counts divided by the size factors).
    genes
        Gene names (column titles).
    path
        Output PNG.
    titles
        Row labels.
    """
    locations, genes = np.asarray(locations, dtype=float), list(genes)
    raw, denoised = np.asarray(raw, dtype=float), np.asarray(denoised, dtype=float)
    if raw.shape != denoised.shape or raw.shape != (len(locations), len(genes)):
        raise ValueError(f"raw {raw.shape} and denoised {denoised.shape} must both be n_spots x n_genes = "
                         f"{(len(locations), len(genes))}")
    fig, axes = plt.subplots(2, len(genes), figsize=(3.2 * len(genes), 6.0), squeeze=False)
    size = max(1.0, 6000.0 / len(locations))
    for column, gene in enumerate(genes):
        for row, (values, name) in enumerate(zip((raw, denoised), titles)):
            _value_panel(fig, axes[row, column], locations, values[:, column], f"{gene} ({name})", size)
    _save(fig, path)


def plot_gene_spatial(panels: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, *, gene: str,
                      log: bool = True) -> None:
    """Save a PNG of one gene in space, one panel per entry of ``panels`` (e.g. raw / denoised / enhanced).

    Parameters
    ----------
    panels
        Panel title to ``(locations, values)``: ``n x 2`` coordinates and ``n`` values. The panels may have
        different points (spots and the ``5N`` enhanced sub-spots); the marker size shrinks with their density.
    path
        Output PNG.
    gene
        Gene name for the titles.
    log
        Colour by ``log1p`` of the values.
    """
    if not panels:
        raise ValueError("panels is empty: give at least one 'title': (locations, values)")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (name, (locations, values)) in zip(axes[0], panels.items()):
        locations, values = np.asarray(locations, dtype=float), np.asarray(values, dtype=float).ravel()
        if locations.shape != (len(values), 2):
            raise ValueError(f"panel '{name}': locations {locations.shape} do not match {len(values)} values")
        _value_panel(fig, ax, locations, values, f"{gene}: {name} ({len(values)} points)",
                     float(np.clip(80000.0 / len(values), 0.3, 60.0)), log=log)
    _save(fig, path)


def plot_volcano(table: pd.DataFrame, path: str | os.PathLike, *, lfc_key: str = "LFC",
                 score_key: str = "bayes_factor", n_labels: int = 10, title: str = "differential expression") -> None:
    """Save a volcano plot of a :func:`spavae.analysis.differential_expression` table.

    x is the log2 fold change, y the log Bayes factor of DE; the ``n_labels`` genes with the largest score
    (ties broken by ``|LFC|``) are named. Genes with ``prob_DE >= 0.8`` (when the column exists) are coloured.
    """
    missing = [k for k in (lfc_key, score_key) if k not in table]
    if missing:
        raise KeyError(f"table has no column(s) {missing}; columns: {list(table.columns)}")
    lfc, score = table[lfc_key].to_numpy(float), table[score_key].to_numpy(float)
    called = table["prob_DE"].to_numpy() >= 0.8 if "prob_DE" in table else np.zeros(len(table), bool)
    fig, ax = plt.subplots(figsize=(6.0, 4.8))
    ax.scatter(lfc[~called], score[~called], s=6, color="lightgrey", linewidths=0, label="prob_DE < 0.8")
    ax.scatter(lfc[called], score[called], s=8, color="tab:red", linewidths=0, label="prob_DE >= 0.8")
    top = np.lexsort((-np.abs(lfc), -score))[:n_labels]
    for i in top:
        ax.annotate(str(table.index[i]), (lfc[i], score[i]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.axvline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel(f"{lfc_key} (log2)"), ax.set_ylabel(score_key), ax.set_title(title)
    ax.legend(fontsize=7, frameon=False)
    _save(fig, path)

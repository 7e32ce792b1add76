"""The layout of a ``spavae train`` run folder, and the data its config names.

Shared by :mod:`spavae.experiment`, which writes run folders, and :func:`spavae.analysis.open_run`, which reads
them for analysis.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import anndata as ad

from spavae.config import ExperimentConfig
from spavae.data import filter_empty, read


class RunFolder:
    """Paths inside one run folder ``<save_dir>/<name>/``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.checkpoint = self.root / "checkpoint"
        self.log = self.root / "log"
        self.results = self.root / "results"
        self.config = self.checkpoint / "config.json"
        self.split = self.checkpoint / "split.json"
        self.best = self.checkpoint / "model_best.pth"
        self.history = self.log / "history.csv"

    def checkpoint_file(self, epoch: int) -> Path:
        """``checkpoint-epoch<epoch>.pth``."""
        return self.checkpoint / f"checkpoint-epoch{epoch}.pth"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(epoch, path)`` of every epoch checkpoint, oldest first."""
        found = []
        for path in self.checkpoint.glob("checkpoint-epoch*.pth"):
            match = re.fullmatch(r"checkpoint-epoch(\d+)\.pth", path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)


def load_data(config: ExperimentConfig) -> ad.AnnData:
    """Read ``data.path`` (spaVAE .h5 or .h5ad) and drop zero-count spots and genes."""
    data = config.data
    if data.path is None:
        raise ValueError("data.path: no input file; set it in the config or pass --data PATH")
    options = {"layer": data.layer, "spatial_key": data.spatial_key, "label_key": data.label_key} \
        if str(data.path).endswith(".h5ad") else {}
    return filter_empty(read(data.path, **{k: v for k, v in options.items() if v is not None}))

"""The output writer of the commands: every file written atomically, the earlier outputs of a folder guarded, and a
report of what was written."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import anndata as ad
import pandas as pd

from spavae.api import SpaVAE
from spavae.utils import atomic_path


def _plain(value: object) -> object:
    """JSON form of NumPy scalars and arrays."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


class Outputs:
    """Writes the files of one command into its folder, each atomically, and reports what it wrote."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.names: list[str] = []

    def refuse_earlier(self, names: Sequence[str], *, overwrite: bool) -> None:
        """Raise a one-line FileExistsError when the folder holds any of ``names`` (the outputs of an earlier run)
        and ``overwrite`` is false; to be called before any work, so that nothing is computed for nothing."""
        earlier = [name for name in names if (self.folder / name).exists()]
        if earlier and not overwrite:
            raise FileExistsError(f"{self.folder} already holds the outputs of an earlier run ({', '.join(earlier)}); "
                                  f"give --overwrite to replace them, or --out NEWDIR for a new folder")

    def remove_unwritten(self, names: Sequence[str]) -> None:
        """Remove the files of ``names`` that this command did not write: left by an earlier run it replaced, they
        would describe another run."""
        for name in set(names) - set(self.names):
            (self.folder / name).unlink(missing_ok=True)

    def _path(self, name: str) -> Path:
        self.names.append(name)
        return self.folder / name

    def csv(self, name: str, table: pd.DataFrame, *, index: bool = True) -> None:
        """``table`` (with its index unless ``index=False``) as ``name``."""
        with atomic_path(self._path(name)) as tmp:
            table.to_csv(tmp, index=index)

    def h5ad(self, name: str, adata: ad.AnnData) -> None:
        """``adata`` as ``name``."""
        with atomic_path(self._path(name)) as tmp:
            adata.write_h5ad(tmp)

    def json(self, name: str, value: dict) -> None:
        """``value`` as indented JSON."""
        with atomic_path(self._path(name)) as tmp:
            tmp.write_text(json.dumps(value, indent=2, default=_plain) + "\n")

    def figure(self, name: str, plot: Callable, *args, **kwargs) -> None:
        """``plot(*args, path, **kwargs)``: a :mod:`spavae.plot` function (those write atomically)."""
        plot(*args, self._path(name), **kwargs)

    def model(self, name: str, model: SpaVAE) -> None:
        """``model.save`` as ``name`` (replacing an older file)."""
        model.save(self._path(name), overwrite=True)

    def report(self) -> None:
        """Print the folder and the files written."""
        print(f"wrote {self.folder}/: {', '.join(self.names)}", flush=True)

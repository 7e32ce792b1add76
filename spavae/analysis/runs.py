"""Open a trained run for analysis: its spots (AnnData) and its model, from any of the three places they live.

* a ``spavae run`` folder: ``results.h5ad`` and ``model.pt``;
* a ``spavae train`` run folder: ``checkpoint/config.json`` (whose ``data`` section names the input file) and
  ``checkpoint/model_best.pth``; the domains of ``spavae evaluate`` (``results/domains.csv``) become
  ``obs['spavae_domain']`` and ``obs['spavae_domain_refined']``, as in a ``spavae run`` folder;
* a ``.h5ad`` file with the spots the model was trained on (raw counts, coordinates) and a model file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import pandas as pd

from spavae.api import SpaVAE
from spavae.config import load_config
from spavae.run_folder import RunFolder, load_data

RUN_FILES = ("results.h5ad", "model.pt")
TRAIN_DOMAIN_COLUMNS = {"domain": "spavae_domain", "domain_refined": "spavae_domain_refined"}
LATENT_KEY = "X_spavae"


@dataclass
class TrainedRun:
    """The spots of a trained run, its model file and the folder its analyses go to by default.

    Attributes
    ----------
    adata
        The spots and genes the model was trained on (raw counts, coordinates, labels when the input had them).
    model_path
        The saved :class:`~spavae.SpaVAE` (``None`` for a ``.h5ad`` given without a model file).
    kind
        ``'run'`` (``spavae run`` folder), ``'train'`` (``spavae train`` run folder) or ``'h5ad'``.
    output_root
        Default parent of the analysis folders: the run folder, ``<run>/results`` for a train run, or the
        folder of the ``.h5ad``.
    device
        Device the model is loaded on (``None``: the one it was saved with).
    """

    adata: ad.AnnData
    model_path: Path | None
    kind: str
    output_root: Path
    device: str | None = None
    _model: SpaVAE | None = field(default=None, repr=False)

    def model(self) -> SpaVAE:
        """The trained model, loaded on first use."""
        if self._model is None:
            if self.model_path is None:
                raise ValueError("this analysis needs the trained model: give the model file with --model "
                                 "(model.pt of `spavae run`, checkpoint/model_best.pth of `spavae train`)")
            if not self.model_path.is_file():
                raise FileNotFoundError(f"model file {self.model_path} not found")
            self._model = SpaVAE.load(self.model_path, self.adata, device=self.device)
            self._model.check_trained()
        return self._model

    def ensure_latent(self) -> None:
        """Make sure ``adata.obsm['X_spavae']`` holds the latent (computed with the model when it is absent)."""
        if LATENT_KEY not in self.adata.obsm:
            self.adata.obsm[LATENT_KEY] = self.model().get_latent_representation()

    def is_multi_section(self) -> bool:
        """Whether the model was trained on several sections (``batch_key``)."""
        return self.model().init_params.get("batch_key") is not None


def _read_h5ad(path: Path) -> ad.AnnData:
    try:
        return ad.read_h5ad(path)
    except OSError as err:
        raise ValueError(f"{path} is not a readable .h5ad file ({err})") from err


def _train_run(root: Path, device: str | None) -> TrainedRun:
    run = RunFolder(root)
    config = load_config(run.config)
    if config.data.path is None or not Path(config.data.path).is_file():
        raise FileNotFoundError(f"the data of run {root} ({config.data.path}, data.path of {run.config}) is missing")
    adata = load_data(config)
    domains = run.results / "domains.csv"
    if domains.is_file():
        table = pd.read_csv(domains, index_col=0)
        table.index = table.index.astype(str)
        if set(table.index) == set(adata.obs_names):
            for column, key in TRAIN_DOMAIN_COLUMNS.items():
                if column in table:
                    adata.obs[key] = pd.Categorical(table.loc[adata.obs_names, column].astype(str))
    return TrainedRun(adata, run.best, "train", run.results, device or config.trainer.device)


def open_run(source: str | os.PathLike, *, model_path: str | os.PathLike | None = None,
             device: str | None = None) -> TrainedRun:
    """Open a ``spavae run`` folder, a ``spavae train`` run folder or a ``.h5ad`` file for analysis.

    Parameters
    ----------
    source
        The folder or file (see the module documentation for what each holds).
    model_path
        Model file to use instead of the folder's own; needed with a ``.h5ad`` for the analyses that decode.
    device
        Load the model on this device instead of the one it was saved with.

    Returns
    -------
    The :class:`TrainedRun`; the model itself is loaded when first asked for.
    """
    source = Path(source)
    model = None if model_path is None else Path(model_path)
    if source.is_dir() and (source / "checkpoint" / "config.json").is_file():
        run = _train_run(source, device)
        run.model_path = model or run.model_path
        return run
    if source.is_dir():
        missing = [name for name in RUN_FILES if not (source / name).is_file()]
        if "results.h5ad" in missing:
            raise FileNotFoundError(f"{source} is not a run folder: it has neither results.h5ad and model.pt "
                                    "(`spavae run`) nor checkpoint/config.json (`spavae train`)")
        if model is None and missing:
            raise FileNotFoundError(f"{source / 'model.pt'} not found: the run folder has no model; give one with "
                                    "--model")
        return TrainedRun(_read_h5ad(source / "results.h5ad"), model or source / "model.pt", "run", source, device)
    if source.suffix == ".h5ad" and source.is_file():
        return TrainedRun(_read_h5ad(source), model, "h5ad", source.parent, device)
    raise FileNotFoundError(f"{source} not found: give a `spavae run` folder, a `spavae train` run folder or a "
                            ".h5ad file")

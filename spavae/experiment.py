"""Experiments: train a config into a run folder with checkpoints, logs and TensorBoard events; resume; evaluate.

A run lives in ``<save_dir>/<name>/``::

    checkpoint/config.json               the validated config (data path made absolute)
    checkpoint/split.json                the held-out test spots (when data.test_size > 0)
    checkpoint/checkpoint-epoch<N>.pth   full training state every trainer.checkpoint_every epochs and at the end
    checkpoint/model_best.pth            the best validation weights so far (a SpaVAE.save file)
    log/train.log                        text log, one line per epoch
    log/history.csv                      the per-epoch history
    log/events.out.tfevents.*            TensorBoard scalars
    results/                             written by evaluate: metrics.json, latent.csv, domains.csv, figures

Every file is written atomically (a temporary file renamed into place), so a killed run leaves its last
checkpoint readable and :func:`resume` continues from it exactly.

Under ``torchrun`` (``spavae train --devices N``) :func:`train` and :func:`resume` train one model data-parallel
over the ranks (:mod:`spavae.distributed`): rank 0 makes the run folder, fits the data setup, picks the checkpoint
and writes every file and log; each rank reads the data itself.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import logging.config
import math
import os
import pickle
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from sklearn.feature_selection import f_classif
from sklearn.neighbors import KNeighborsClassifier

from spavae import __version__
from spavae.analysis.clustering import labelled_spots, score_clustering, visium_array_to_xy
from spavae.analysis.domains import cluster_domains
from spavae.analysis.prediction import predict_latent
from spavae.api import SpaVAE
from spavae.config import ExperimentConfig, load_config
from spavae.data import normalize_log_scale, size_factors
from spavae.data.readers import LABEL_KEY, UNLABELLED
from spavae.data.setup import DataSetup
from spavae.distributed import Communicator, session
from spavae.run_folder import RunFolder, load_data
from spavae.train import Trainer
from spavae.utils import atomic_path

logger = logging.getLogger("spavae.experiment")

CHECKPOINT_FORMAT = 1
#: Marker genes for the evaluation figure are chosen on at most this many spots (the figure shows every spot).
MARKER_SAMPLE = 5000
TB_PARTS = {"loss": "total", "nb": "nb", "kl_gp": "kl_gp", "kl_gauss": "kl_gauss", "noise": "noise"}
"""History columns (``train_``/``val_`` prefixed) written to TensorBoard, with their tag names."""


# ---------------------------------------------------------------------- data
def draw_test_spots(obs_names: pd.Index, test_size: float, seed: int) -> list[str]:
    """A seeded random ``test_size`` fraction (at least one spot, at most all but four) of the spot names."""
    n_test = min(max(int(round(len(obs_names) * test_size)), 1), len(obs_names) - 4)
    order = np.random.default_rng(seed).permutation(len(obs_names))
    return [str(name) for name in obs_names[np.sort(order[:n_test])]]


def _split(adata: ad.AnnData, run: RunFolder) -> tuple[ad.AnnData, np.ndarray]:
    """The training spots and a boolean mask of the test spots (all False without a test set)."""
    test = np.zeros(adata.n_obs, dtype=bool)
    if run.split.exists():
        names = set(json.loads(run.split.read_text())["test_spots"])
        test = np.array([name in names for name in adata.obs_names])
        if test.sum() != len(names):
            raise ValueError(f"{run.split} names {len(names)} test spots but only {int(test.sum())} are in the data")
    return adata[~test].copy(), test


# ---------------------------------------------------------------------- logging and recording
def _read_log_config(path: str | os.PathLike | None) -> dict | None:
    """The JSON logging config at ``path`` (``None`` without one); a one-line error when it cannot be used."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"logging config {path}: no such file (--log-config)")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"logging config {path}: not valid JSON ({err})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"logging config {path}: expected a logging.config.dictConfig object")
    return spec


@contextlib.contextmanager
def run_logging(run: RunFolder, log_config: str | os.PathLike | None = None) -> Iterator[None]:
    """Log to ``log/train.log`` (epoch lines at DEBUG) and to the console (INFO) for the duration of a run.

    With ``log_config``, a JSON :func:`logging.config.dictConfig` file is applied instead; relative
    ``filename`` entries of its handlers are placed in the run's ``log/`` folder.
    """
    spec = _read_log_config(log_config)
    run.log.mkdir(parents=True, exist_ok=True)
    if spec is not None:
        for handler in spec.get("handlers", {}).values():
            if "filename" in handler and not Path(handler["filename"]).is_absolute():
                handler["filename"] = str(run.log / handler["filename"])
        logging.config.dictConfig(spec)
        yield
        return
    package = logging.getLogger("spavae")
    saved = package.level, package.propagate
    file_handler = logging.FileHandler(run.log / "train.log")
    file_handler.setLevel(logging.DEBUG)
    console = logging.StreamHandler()
    console.setLevel(logging.INFO)
    for handler in (file_handler, console):
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        package.addHandler(handler)
    package.setLevel(logging.DEBUG)
    package.propagate = False
    try:
        yield
    finally:
        for handler in (file_handler, console):
            package.removeHandler(handler)
            handler.close()
        package.setLevel(saved[0])
        package.propagate = saved[1]


class Recorder:
    """Per-epoch trainer callback: log line, TensorBoard scalars, best model and periodic checkpoints.

    In data-parallel training every rank calls it (a checkpoint gathers the random states of all ranks) and rank 0
    alone writes.
    """

    def __init__(self, model: SpaVAE, config: ExperimentConfig, run: RunFolder, start_epoch: int,
                 communicator: Communicator | None = None):
        self.model, self.config, self.run = model, config, run
        self.is_main = communicator is None or communicator.is_main
        self.writer = None
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

            # purge_step drops events a killed run wrote after its last checkpoint, so curves do not double up
            self.writer = SummaryWriter(str(run.log), purge_step=start_epoch + 1 if start_epoch else None)
        self.saved: tuple[int, str | None] | None = None

    def __call__(self, trainer: Trainer, record: dict) -> None:
        epoch = record["epoch"]
        stop = trainer.state.stop_reason is not None or epoch >= self.config.trainer.max_epochs
        if self.is_main:
            self._record(trainer, record)
        if stop or epoch % self.config.trainer.checkpoint_every == 0:
            self.checkpoint(trainer)

    def _record(self, trainer: Trainer, record: dict) -> None:
        """Event scalars, the log line and the best model of one epoch."""
        epoch = record["epoch"]
        for split, prefix in (("train", "train_"), ("validation", "val_")):
            for column, tag in TB_PARTS.items():
                if prefix + column in record:
                    self.writer.add_scalar(f"{split}/{tag}", record[prefix + column], epoch)
        for column in ("beta", "lr", "kernel_scale"):
            self.writer.add_scalar(column, record[column], epoch)
        self.writer.flush()
        logger.debug("epoch %d: %s", epoch, ", ".join(f"{k} {v:.6g}" for k, v in record.items() if k != "epoch"))
        if trainer.has_validation and trainer.state.best_epoch == epoch:
            self._save_model(trainer, self.run.best)

    def _save_model(self, trainer: Trainer, path: Path) -> None:
        """The module's current weights as a :meth:`SpaVAE.save` file (usable by :meth:`SpaVAE.load`)."""
        self.model.history = pd.DataFrame(trainer.state.history)
        self.model.is_trained = True  # the weights of a completed epoch are a usable model
        self.model.save(path, overwrite=True)

    def checkpoint(self, trainer: Trainer) -> None:
        """Write ``checkpoint-epoch<N>.pth`` (and the history) atomically; prune old ones if configured."""
        state = trainer.state
        payload = {"format": CHECKPOINT_FORMAT, "spavae": __version__, "epoch": state.epoch,
                   "config": self.config.to_dict(), "trainer": trainer.state_dict()}
        self.saved = (state.epoch, state.stop_reason)
        if not self.is_main:
            return
        with atomic_path(self.run.checkpoint_file(state.epoch)) as tmp:
            torch.save(payload, tmp)
        with atomic_path(self.run.history) as tmp:
            pd.DataFrame(state.history).to_csv(tmp, index=False)
        logger.info("saved checkpoint-epoch%d.pth", state.epoch)
        keep = self.config.trainer.keep_checkpoints
        if keep is not None:
            for _, old in self.run.checkpoints()[:-keep]:
                old.unlink()

    def finish(self, trainer: Trainer) -> None:
        """After training: a last checkpoint if the loop ended without one (a NaN stop), the final weights as
        ``model_best.pth`` when there is no validation set, and close the event file."""
        if self.saved != (trainer.state.epoch, trainer.state.stop_reason):
            self.checkpoint(trainer)
        if not trainer.has_validation and self.is_main:
            self._save_model(trainer, self.run.best)
        self.close()

    def close(self) -> None:
        """Close the event file (rank 0)."""
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------- train / resume
def train(config: ExperimentConfig, *, log_config: str | os.PathLike | None = None, overwrite: bool = False,
          evaluate_after: bool = True) -> RunFolder:
    """Train ``config`` into a new run folder ``<save_dir>/<name>/`` (then evaluate it, by default).

    Parameters
    ----------
    config
        The validated experiment config.
    log_config
        Optional JSON logging config (:func:`run_logging`).
    overwrite
        Replace an existing run folder of the same name (otherwise that is an error).
    evaluate_after
        Run :func:`evaluate` when training ends.
    """
    run = RunFolder(Path(config.save_dir) / config.name)
    _read_log_config(log_config)  # before the run folder is made
    with session(config.trainer.device) as communicator:
        communicator.on_main(_clear_run_folder, run, overwrite)
        if config.data.path is not None:
            config.data.path = str(Path(config.data.path).resolve())
        adata = load_data(config)
        communicator.on_main(_start_run_folder, run, config, adata)
        with _rank_logging(run, log_config, communicator):
            logger.info("spavae %s: run %s, data %s", __version__, run.root, config.data.path)
            if communicator.world_size > 1:
                logger.info("data-parallel training over %d processes", communicator.world_size)
            _fit(config, run, adata, None, communicator)
    if evaluate_after and communicator.is_main:
        evaluate(run.root, log_config=log_config)
    return run


def _clear_run_folder(run: RunFolder, overwrite: bool) -> None:
    if run.root.exists() and any(run.root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run folder {run.root} already exists: continue it with `spavae resume {run.root}`, "
                                  "pick another name (--name) or replace it (--overwrite)")
        shutil.rmtree(run.root)


def _start_run_folder(run: RunFolder, config: ExperimentConfig, adata: ad.AnnData) -> None:
    run.checkpoint.mkdir(parents=True, exist_ok=True)
    config.save(run.config)
    if config.data.test_size > 0:
        test_spots = draw_test_spots(adata.obs_names, config.data.test_size, config.data.test_seed)
        with atomic_path(run.split) as tmp:
            tmp.write_text(json.dumps({"test_size": config.data.test_size, "seed": config.data.test_seed,
                                       "test_spots": test_spots}))


def _rank_logging(run: RunFolder, log_config: str | os.PathLike | None,
                  communicator: Communicator) -> contextlib.AbstractContextManager:
    """:func:`run_logging` on rank 0; the other ranks log nowhere new."""
    return run_logging(run, log_config) if communicator.is_main else contextlib.nullcontext()


def latest_checkpoint(run: RunFolder) -> dict:
    """The newest checkpoint of ``run`` that loads; a clear error when there is none."""
    found = run.checkpoints()
    if not found:
        raise FileNotFoundError(f"{run.checkpoint} has no checkpoint-epoch*.pth yet (the run stopped before its first "
                                f"checkpoint): start it again with `spavae train -c {run.config} --overwrite`")
    for epoch, path in reversed(found):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:  # a file damaged outside spavae
            logger.warning("could not read %s (%s); trying an older checkpoint", path.name, err)
    raise FileNotFoundError(f"no readable checkpoint in {run.checkpoint}: start the run again with "
                            f"`spavae train -c {run.config} --overwrite`")


def resume(run_dir: str | os.PathLike, *, log_config: str | os.PathLike | None = None,
           evaluate_after: bool = True) -> RunFolder:
    """Continue a run from its newest checkpoint with exactly the state it had (then evaluate, by default)."""
    run = RunFolder(run_dir)
    if not run.config.is_file():
        raise FileNotFoundError(f"{run.root} is not a spavae run folder (no checkpoint/config.json)")
    config = load_config(run.config)
    with session(config.trainer.device) as communicator, _rank_logging(run, log_config, communicator):
        checkpoint = communicator.on_main(latest_checkpoint, run)
        state = checkpoint["trainer"]["state"]
        if state["stop_reason"] is not None or state["epoch"] >= config.trainer.max_epochs:
            logger.info("run %s already finished at epoch %d (%s); nothing to train", run.root, state["epoch"],
                        state["stop_reason"] or "max_epochs reached")
        else:
            logger.info("resuming %s from checkpoint-epoch%d.pth%s", run.root, checkpoint["epoch"],
                        f" on {communicator.world_size} processes" if communicator.world_size > 1 else "")
            _fit(config, run, load_data(config), checkpoint, communicator)
    if evaluate_after and communicator.is_main:
        evaluate(run.root, log_config=log_config)
    return run


def _use_threads(config: ExperimentConfig) -> None:
    if config.trainer.threads:
        torch.set_num_threads(config.trainer.threads)


def _fit(config: ExperimentConfig, run: RunFolder, adata: ad.AnnData, checkpoint: dict | None,
         communicator: Communicator) -> SpaVAE:
    _use_threads(config)
    train_adata, _ = _split(adata, run)
    options = config.model_kwargs()
    setup = None
    if communicator.world_size > 1:  # fitted once, on rank 0, so that every rank prepares the spots identically
        setup_options = {k: v for k, v in options.items() if k in inspect.signature(DataSetup.fit).parameters}
        setup = communicator.on_main(DataSetup.fit, train_adata, **setup_options)
    model = SpaVAE(train_adata, setup=setup, **options)
    recorder = Recorder(model, config, run, checkpoint["epoch"] if checkpoint else 0, communicator)
    start = time.perf_counter()
    trained = False
    try:
        model.train(**config.train_kwargs(), callbacks=[recorder],
                    resume=checkpoint["trainer"] if checkpoint else None)
        trained = True
    finally:
        # after a failure of a data-parallel run the other ranks may be gone: no last checkpoint (a collective)
        if hasattr(model, "trainer") and (trained or communicator.world_size == 1):
            recorder.finish(model.trainer)
        else:
            recorder.close()
    state = model.trainer.state
    logger.info("training ended at epoch %d (%s) after %.1f s; best validation loss %.4f at epoch %d",
                state.epoch, state.stop_reason or "max_epochs reached", time.perf_counter() - start,
                state.best_loss, state.best_epoch)
    return model


# ---------------------------------------------------------------------- evaluate
def evaluate(run_dir: str | os.PathLike, *, log_config: str | os.PathLike | None = None) -> dict:
    """Latent, domains, scores and figures of a trained run, written to ``results/``; returns the metrics.

    The model of ``model_best.pth`` embeds **all** spots (test spots included: their expression goes through the
    encoder, and the GP posterior conditions on every spot). KMeans clusters the latent; with labels, ARI/NMI are
    scored on all labelled spots and, with a test set, on the labelled test spots. With a test set, a k-NN
    classifier trained on the labelled training spots' latents also predicts the test spots' labels, twice:

    * ``knn_accuracy_location_only``: the interpolation protocol of ALGORITHM 7.4 and of published figures; the
      test spots' latents are predicted from their locations alone (:func:`location_only_latents`);
    * ``knn_accuracy_with_expression``: the test spots' latents from the all-spots embedding above, which reads
      their own expression (an easier task, not comparable with published interpolation figures).
    """
    from spavae.analysis.embedding import umap
    from spavae.plot import plot_embedding, plot_marker_genes, plot_spatial_domains, plot_training_curves

    run = RunFolder(run_dir)
    if not run.best.is_file():
        raise FileNotFoundError(f"{run.best} not found: train the run first (`spavae train`) or resume it")
    config = load_config(run.config)
    ev = config.evaluation
    _use_threads(config)
    with run_logging(run, log_config):
        adata = load_data(config)
        _, test = _split(adata, run)
        model = SpaVAE.load(run.best, adata, device=config.trainer.device)
        history = pd.read_csv(run.history) if run.history.is_file() else model.history
        latent = model.get_latent_representation()
        truth = adata.obs[LABEL_KEY].astype(str).to_numpy() if LABEL_KEY in adata.obs else None
        locations = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        lattice = visium_array_to_xy(locations) if ev.lattice == "visium_array" else locations
        found = cluster_domains(latent, lattice, ev.n_domains, refine=ev.refine, truth=truth, unlabeled=UNLABELLED,
                                n_init=ev.kmeans_n_init, seed=config.trainer.seed)
        if found.chosen_by == "leiden":
            logger.info("chose %d domains by counting the Leiden communities of the latent (no labelled spot)",
                        found.n_domains)
        domains = found.labels
        refined = domains if found.refined is None else found.refined
        shown = truth if found.scores is not None else None  # labels without a labelled spot are no labels
        metrics: dict = {"run": str(run.root), "n_spots": adata.n_obs, "n_test": int(test.sum()),
                         "n_domains": found.n_domains, "n_domains_chosen_by": found.chosen_by,
                         "epochs": int(len(history)), "best_epoch": int(len(model.history)),
                         "train_seconds": round(float(history["seconds"].sum()), 2)}
        if found.scores is not None:
            metrics["all"] = _rounded(found.scores)
            if labelled_spots(truth[test], UNLABELLED).any():
                metrics["test"] = _rounded({"labels": score_clustering(truth[test], domains[test]),
                                            "refined": score_clustering(truth[test], refined[test])})
                train_latent, test_latent = location_only_latents(run.best, adata, test, device=config.trainer.device)
                metrics["knn_accuracy_location_only"] = knn_accuracy(train_latent, truth[~test], test_latent,
                                                                     truth[test], ev.knn_neighbors)
                metrics["knn_accuracy_with_expression"] = knn_accuracy(latent[~test], truth[~test], latent[test],
                                                                       truth[test], ev.knn_neighbors)
        logger.info("evaluation of %s: %s", run.root, json.dumps(metrics))
        tables = {"latent.csv": pd.DataFrame(latent, index=adata.obs_names, columns=model.latent_names),
                  "domains.csv": pd.DataFrame({"domain": domains, "domain_refined": refined, "test": test,
                                               **({"truth": truth} if truth is not None else {})},
                                              index=adata.obs_names)}
        for name, table in tables.items():
            with atomic_path(run.results / name) as tmp:
                table.to_csv(tmp)
        plot_spatial_domains(lattice, refined, run.results / "domains.png", truth=shown,
                             title="spavae domains" + (" (refined)" if ev.refine else ""))
        colours = shown if shown is not None else refined.astype(str)
        if ev.umap:
            adata.obsm["X_spavae"] = latent
            umap(adata, seed=config.trainer.seed)
            plot_embedding(adata.obsm["X_umap"], colours, run.results / "umap.png",
                           title="latent UMAP, coloured by " + ("ground truth" if shown is not None else "domain"))
        sample = np.sort(np.random.default_rng(config.trainer.seed).permutation(adata.n_obs)[:MARKER_SAMPLE])
        genes = ev.marker_genes or marker_genes(model.data.counts.take(sample), refined[sample], model.var_names,
                                                ev.n_marker_genes)
        missing = [g for g in genes if g not in model.var_names]
        if missing:
            raise ValueError(f"evaluation.marker_genes: {missing} are not genes of the model")
        scale = model.data.size_factors.cpu().numpy()[:, None]
        raw = model.data.gene_counts(model.var_names.get_indexer(genes))
        denoised = model.get_denoised_counts(n_samples=ev.denoise_samples, genes=genes)
        plot_marker_genes(lattice, raw / scale, denoised / scale, genes, run.results / "markers.png")
        plot_training_curves(history, run.results / "training.png")
        with atomic_path(run.results / "metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _rounded(scores: dict[str, dict]) -> dict:
    """The ARI/NMI of the domains and of the refined domains (the domains themselves without refinement), rounded."""
    raw, ref = scores["labels"], scores.get("refined", scores["labels"])
    return {"ari": round(raw["ari"], 4), "nmi": round(raw["nmi"], 4), "ari_refined": round(ref["ari"], 4),
            "nmi_refined": round(ref["nmi"], 4), "n_scored": raw["n_scored"]}


def location_only_latents(model_file: str | os.PathLike, adata: ad.AnnData, test: np.ndarray, *,
                          device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Latents of the interpolation protocol (ALGORITHM 7.4), which never reads the test spots' expression.

    The saved model is loaded for the training spots only (so its GP posterior conditions on them alone), the
    training spots are embedded as usual, and the test spots' latents are predicted from their locations with
    :func:`spavae.analysis.predict_latent` (GP dimensions from the trained GP, Gaussian dimensions from the nearest
    training spot), as ``benchmarks/interpolation.py`` does.

    Parameters
    ----------
    model_file
        A :meth:`SpaVAE.save` file of a model trained on ``adata[~test]``.
    adata
        All spots (training and test), with ``obsm['spatial']``.
    test
        Boolean mask of the test spots.
    device
        Device to load the model on (its saved setting by default).

    Returns
    -------
    ``(train_latent, test_latent)``: ``(~test).sum() x D`` and ``test.sum() x D`` arrays.
    """
    test = np.asarray(test, dtype=bool)
    if test.shape != (adata.n_obs,) or not test.any() or test.all():
        raise ValueError("test must be a boolean mask over the spots with at least one test and one training spot")
    model = SpaVAE.load(model_file, adata[~test].copy(), device=device)
    test_latent = predict_latent(model, np.asarray(adata.obsm["spatial"])[test])[0].cpu().numpy()
    return model.get_latent_representation(), test_latent


def knn_accuracy(train_latent: np.ndarray, train_labels: np.ndarray, test_latent: np.ndarray,
                 test_labels: np.ndarray, k: int = 11) -> float:
    """Accuracy of a ``k``-nearest-neighbour classifier fitted on labelled training latents, on labelled test spots.

    Spots labelled ``'NA'`` are left out on both sides (ALGORITHM 7.4).
    """
    fit, score = train_labels != UNLABELLED, test_labels != UNLABELLED
    if fit.sum() < k or not score.any():
        raise ValueError(f"the k-NN accuracy needs at least {k} labelled training spots and one labelled test spot")
    classifier = KNeighborsClassifier(n_neighbors=k).fit(train_latent[fit], train_labels[fit])
    return round(float((classifier.predict(test_latent[score]) == test_labels[score]).mean()), 4)


def marker_genes(counts: np.ndarray, domains: np.ndarray, names: pd.Index, n: int) -> list[str]:
    """The ``n`` genes whose normalised log expression best separates ``domains`` (largest ANOVA F)."""
    expression = normalize_log_scale(counts, size_factors(counts))
    with np.errstate(divide="ignore", invalid="ignore"):
        f_scores = np.nan_to_num(f_classif(expression, domains)[0], nan=-math.inf)
    return [str(names[i]) for i in np.argsort(-f_scores)[:n]]

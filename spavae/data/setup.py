"""The fitted data setup: what a model learns from its training AnnData before any weight is trained.

:meth:`DataSetup.fit` reads the training AnnData once, in chunks of spots (sparse, dense or on-disk input alike),
and keeps everything the model's inputs are computed from (ALGORITHM 1.2-1.5):

* the model's genes and their order (after optional highly-variable-gene selection, :mod:`spavae.data.genes`);
* the library genes and the size-factor reference: a spot's library size ``n_i`` is its total count over all the
  genes of the training data (the whole transcriptome when highly variable genes were selected, so that a spot
  with no count in the selected genes is an ordinary observation of zeros), and ``s_i = n_i / median`` with the
  median library size of the training spots;
* the per-gene mean and SD of ``log1p(counts / s)`` that z-score the encoder input (and those of the proteins);
* on a section with many more genes than spots, the principal axes the encoder reads instead of the genes
  (:mod:`spavae.data.input_axes`);
* the location frame of each section (:class:`~spavae.data.frame.LocationFrame`) and the section names;
* the inducing points;
* with the image view, how the per-spot image features are computed and standardised (:mod:`spavae.image`).

The setup is saved in the model file and applied unchanged by ``load``, prediction, denoising and every analysis,
so a spot's inputs never depend on which other spots came with it. :meth:`DataSetup.spots` turns any AnnData with
the model's genes (in any order, extra genes ignored) into :class:`SpotData` for the model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spavae.data.counts import count_matrix, row_chunks
from spavae.data.inducing import grid_inducing_points, kmeans_inducing_points, split_inducing
from spavae.data.input_axes import auto_input_axes, fit_input_axes
from spavae.data.frame import FRAMES, LocationFrame
from spavae.data.preprocess import check_count_block, check_locations
from spavae.utils import check_number

if TYPE_CHECKING:
    from spavae.image.features import ImageFeatures

logger = logging.getLogger("spavae")

#: Fewer spots than this cannot support a GP over locations plus an encoder; refused with a clear error.
MIN_SPOTS = 20
#: A model needs at least this many genes (features).
MIN_GENES = 2
#: Input with more genes than this is reduced to ``AUTO_TOP_GENES`` highly variable genes by default: targeted
#: panels (Visium's probe sets after filtering, Xenium and CosMx panels up to a few thousand genes, the
#: ~1,000-gene DLPFC files) stay whole, whole transcriptomes (about 18,000 genes) are reduced.
AUTO_GENES_THRESHOLD = 6000
#: Number of highly variable genes kept by default (the Seurat/scanpy default).
AUTO_TOP_GENES = 2000
#: Up to this many spots the inducing points are a grid over each section; above, k-means centroids that follow
#: the tissue (see :func:`auto_inducing`).
GRID_MAX_SPOTS = 20_000
#: Grid steps of a section (``(steps + 1)**2`` points) when ``inducing_steps`` is not given: the original's 7 x 7.
GRID_STEPS = 6
#: Grid steps of a section of at most :data:`SMALL_SECTION_SPOTS` spots: 13 x 13 (see :func:`auto_grid_steps`).
SMALL_SECTION_GRID_STEPS = 12
#: A section of at most this many spots is small (see :func:`auto_grid_steps`).
SMALL_SECTION_SPOTS = 2000
#: K-means inducing points of ``inducing='kmeans'`` when ``n_inducing`` is not given.
DEFAULT_KMEANS_INDUCING = 49
#: With several sections, the k-means inducing points the model chooses are shared among the sections in
#: proportion to their spots, but each section gets at least this many (or as many as it has distinct locations).
MIN_SECTION_INDUCING = 4


def auto_inducing(n_spots: int) -> tuple[str, int]:
    """The inducing rule of ``inducing='auto'``: ``'grid'`` up to 20,000 spots, else ``'kmeans'`` and a count.

    A grid is laid over each section, of ``inducing_steps`` steps or else :func:`auto_grid_steps` of the section's
    spots (the count returned with ``'grid'`` is not used).

    The k-means count is ``n_spots / 500`` clipped to ``[49, 300]``: each inducing point is supported by about
    500 spots, and the cap keeps the ``O(b p^2 + p^3)`` GP part of a step below the networks' part
    (``benchmarks/scale.py --gp-cost``, 2 CPU threads, b = 512: 0.12 s measured for p = 400 and 0.07 s predicted by
    the fitted cost model for p = 300, against about 0.09 s for the networks and likelihood of 2,000 genes).
    With several sections ``n_spots`` is their total, and the k-means points are shared among the sections in
    proportion to their spots (at least :data:`MIN_SECTION_INDUCING` each); a grid is laid over each section.
    """
    if n_spots <= GRID_MAX_SPOTS:
        return "grid", 49
    return "kmeans", int(np.clip(n_spots // 500, 49, 300))


def auto_grid_steps(n_spots: int) -> int:
    """Grid steps of a section of ``n_spots`` spots when ``inducing_steps`` is not given: 12 (169 points) up to
    :data:`SMALL_SECTION_SPOTS` spots, else 6 (the original's 49).

    A section of a few hundred spots resolves domains only a few spots wide (tumour regions, olfactory-bulb
    layers); a 7 x 7 grid there is 2.5-4 spot pitches apart, as wide as such a domain, and 13 x 13 puts it at
    1.2-2. On the development panel 169 points raised every section of 200-1,207 spots (+0.01 to +0.08 ARI, 3 seeds)
    but cost the sections of 3,639-4,839 spots 0.015-0.056 (seed 0; the DLPFC layers are tens of spots wide;
    ``benchmarks/results/inducing_density.jsonl``, docs/sizing.md). The bound sits in that gap, at the original's
    batch-size step (256-spot batches up to 2,048 spots).
    """
    return SMALL_SECTION_GRID_STEPS if n_spots <= SMALL_SECTION_SPOTS else GRID_STEPS


def _unique_names(names: pd.Index, what: str, fix: str) -> None:
    if not names.is_unique:
        duplicated = list(names[names.duplicated()][:3])
        raise ValueError(f"adata has duplicated {what} names (e.g. {duplicated}); make them unique first ({fix})")


@dataclass
class DataSetup:
    """Everything the model's inputs are computed from, fitted once on the training data (see the module doc).

    Use :meth:`fit` to create one; the attributes are plain arrays and lists (:meth:`to_dict` / :meth:`from_dict`).
    ``library_genes`` names the genes a spot's library size sums over when they are not the model's genes (all the
    genes of the training data, when highly variable genes were selected); ``None``: the model's genes.
    ``image`` is the fitted state of the image view (:meth:`ImageFeatures.fitted_state
    <spavae.image.ImageFeatures.fitted_state>`: feature names, standardisation, extractor settings and image source),
    or ``None`` for a model without one. ``inducing_method`` says how the inducing points were placed (``'grid'``
    or ``'kmeans'``). ``input_axes`` (genes x axes) projects the z-scored gene input of the encoder onto principal
    axes (:mod:`spavae.data.input_axes`); ``None``: the encoder reads the genes.
    """

    genes: list[str]
    layer: str | None
    spatial_key: str
    batch_key: str | None
    sections: list[str] | None
    protein_key: str | None
    n_proteins: int
    binarize: bool
    library_median: float
    expression_mean: np.ndarray
    expression_sd: np.ndarray
    frames: list[LocationFrame]
    inducing_points: np.ndarray
    gene_selection: dict | None = None
    protein_background: np.ndarray | None = None
    library_genes: list[str] | None = None
    image: dict | None = None
    inducing_method: str | None = None
    input_axes: np.ndarray | None = None

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, adata: ad.AnnData, *, layer: str | None = None, spatial_key: str = "spatial",
            batch_key: str | None = None, protein_key: str | None = None, likelihood: str = "nb",
            n_top_genes: int | str | None = "auto", loc_range: float = 20.0, location_frame: str = "aligned",
            inducing: str = "auto", inducing_steps: int | None = None, n_inducing: int | None = None,
            input_axes: int | str | None = "auto", seed: int = 0,
            image_features: ImageFeatures | None = None) -> DataSetup:
        """Fit the setup on the training AnnData (see :class:`~spavae.SpaVAE` for the parameters).

        ``image_features`` (of ``adata``'s spots, :func:`spavae.image.fit_image_features`) adds the image view: the
        setup keeps their :meth:`~spavae.image.ImageFeatures.fitted_state`, so that the same features are computed,
        the same way, for any spots the model is later applied to.

        Raises a one-line error naming the problem and its fix for anything the model cannot use: missing keys,
        duplicated names, too few spots or genes, non-count values, empty spots or genes, NaN locations.
        """
        if not isinstance(adata, ad.AnnData):
            raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}")
        if likelihood not in ("nb", "bernoulli"):
            raise ValueError(f"likelihood must be 'nb' or 'bernoulli', got {likelihood!r}")
        if inducing not in ("auto", "grid", "kmeans"):
            raise ValueError(f"inducing must be 'auto', 'grid' or 'kmeans', got {inducing!r}")
        if not (input_axes is None or input_axes == "auto" or
                (isinstance(input_axes, (int, np.integer)) and not isinstance(input_axes, bool) and input_axes >= 1)):
            raise ValueError(f"input_axes must be a positive integer, 'auto' or None, got {input_axes!r}")
        if location_frame not in FRAMES:
            raise ValueError(f"location_frame must be one of {list(FRAMES)}, got {location_frame!r}")
        if adata.n_obs < MIN_SPOTS:
            raise ValueError(f"adata has {adata.n_obs} spots; spavae needs at least {MIN_SPOTS} to fit a spatial model")
        _unique_names(pd.Index(adata.obs_names), "spot", "adata.obs_names_make_unique()")
        _unique_names(pd.Index(adata.var_names), "gene", "adata.var_names_make_unique()")
        binarize = likelihood == "bernoulli"
        matrix = count_matrix(adata, layer)
        where = f"layers['{layer}']" if layer else "adata.X"
        sections = _section_names(adata, batch_key)
        labels = None if sections is None else adata.obs[batch_key].astype(str).to_numpy()
        codes = np.zeros(adata.n_obs, dtype=np.int64) if sections is None else \
            pd.Categorical(labels, categories=sections).codes.astype(np.int64)
        genes, selection = cls._select_genes(matrix, pd.Index(adata.var_names), n_top_genes, binarize, where,
                                             batch_key, labels)
        if len(genes) < MIN_GENES:
            raise ValueError(f"{where} has {len(genes)} gene(s); spavae needs at least {MIN_GENES}")
        columns = pd.Index(adata.var_names).get_indexer(genes)
        totals, library_median, mean, sd = _expression_statistics(matrix, columns, binarize, where, layer)
        n_axes = auto_input_axes(adata.n_obs, len(genes), binarize) if input_axes == "auto" else input_axes
        if n_axes is not None and binarize:
            raise ValueError("input_axes applies to counts; binarised peaks (likelihood='bernoulli') are read as they "
                             "are: give input_axes=None")
        axes = None if n_axes is None else \
            fit_input_axes(matrix, columns, totals, library_median, mean, sd, int(n_axes), seed=seed)
        proteins = protein_matrix(adata, protein_key)
        background = None
        if proteins is not None:
            logged = np.log1p(proteins)
            mean = np.concatenate([mean, logged.mean(0)])
            sd = np.concatenate([sd, _safe_sd(logged.std(0, ddof=1), logged.mean(0))])
            from spavae.likelihoods import background_prior_from_counts

            background = np.stack([t.numpy() for t in background_prior_from_counts(proteins, seed=seed)])
        locations = spot_locations(adata, spatial_key)
        if n_inducing is not None:
            check_number("n_inducing", n_inducing, integer=True, low=1)
        frames = [LocationFrame(location_frame, loc_range).fit(locations[codes == index])
                  for index in range(1 if sections is None else len(sections))]
        method, n_points = auto_inducing(adata.n_obs) if inducing == "auto" else \
            (inducing, n_inducing or DEFAULT_KMEANS_INDUCING)
        if method == "grid":
            points = [grid_inducing_points(auto_grid_steps(int((codes == index).sum())) if inducing_steps is None
                                           else inducing_steps, frame.extent) for index, frame in enumerate(frames)]
        else:
            scaled = [frame.transform(locations[codes == index]) for index, frame in enumerate(frames)]
            points = _kmeans_inducing(scaled, n_points, given=inducing == "kmeans" and n_inducing is not None,
                                     seed=seed)
        if sections is not None:
            points = [np.hstack([section_points, np.tile(np.eye(len(sections))[index], (len(section_points), 1))])
                      for index, section_points in enumerate(points)]
        logger.info("data setup: %d spots, %d genes%s%s, %d inducing points (%s)", adata.n_obs, len(genes),
                    f" (highly variable of {selection['n_input_genes']})" if selection else "",
                    "" if axes is None else f" read by the encoder on {axes.shape[1]} principal axes",
                    sum(len(p) for p in points), method)
        return cls(genes=list(genes), layer=layer, spatial_key=spatial_key, batch_key=batch_key, sections=sections,
                   protein_key=protein_key, n_proteins=0 if proteins is None else proteins.shape[1],
                   binarize=binarize, library_median=library_median, expression_mean=mean, expression_sd=sd,
                   frames=frames, inducing_points=np.vstack(points), gene_selection=selection,
                   protein_background=background,
                   library_genes=list(adata.var_names) if selection is not None and not binarize else None,
                   image=None if image_features is None else image_features.fitted_state(),
                   inducing_method=method, input_axes=axes)

    @staticmethod
    def _select_genes(matrix, var_names: pd.Index, n_top_genes, binarize: bool, where: str, batch_key: str | None,
                      labels: np.ndarray | None):
        if not (n_top_genes is None or n_top_genes == "auto" or isinstance(n_top_genes, (int, np.integer))) \
                or isinstance(n_top_genes, bool):
            raise ValueError(f"n_top_genes must be an integer >= {MIN_GENES}, 'auto' or None, got {n_top_genes!r}")
        if n_top_genes == "auto":
            n_top_genes = AUTO_TOP_GENES if len(var_names) > AUTO_GENES_THRESHOLD and not binarize else None
        if n_top_genes is None or n_top_genes >= len(var_names):
            return var_names, None
        if not isinstance(n_top_genes, (int, np.integer)) or n_top_genes < MIN_GENES:
            raise ValueError(f"n_top_genes must be an integer >= {MIN_GENES}, 'auto' or None, got {n_top_genes!r}")
        from spavae.data.genes import highly_variable_genes

        table = highly_variable_genes(matrix, n_top_genes=int(n_top_genes), batches=labels)
        keep = np.sort(np.flatnonzero(table["highly_variable"].to_numpy()))
        logger.info("kept %d highly variable genes of %d in %s (seurat_v3%s)", len(keep), len(var_names), where,
                    f", ranked within each section of obs['{batch_key}']" if batch_key else "")
        selection = {"flavor": "seurat_v3", "n_top_genes": int(n_top_genes), "n_input_genes": len(var_names)}
        return var_names[keep], selection if batch_key is None else selection | {"batch_key": batch_key}

    # ------------------------------------------------------------------ applying
    @property
    def n_genes(self) -> int:
        """Number of model genes."""
        return len(self.genes)

    @property
    def n_image_features(self) -> int:
        """Number of image features (0 without the image view)."""
        return 0 if self.image is None else len(self.image["names"])

    @property
    def n_gene_input(self) -> int:
        """Width of the encoder's gene input: the number of principal axes, or of genes without them."""
        return self.n_genes if self.input_axes is None else self.input_axes.shape[1]

    @property
    def n_input(self) -> int:
        """Width of the encoder input without section covariates (gene input + proteins + image features)."""
        return self.n_gene_input + self.n_proteins + self.n_image_features

    @property
    def n_observed(self) -> int:
        """Number of observed values per spot (genes + proteins + image features): the columns of a batch's counts."""
        return self.n_genes + self.n_proteins + self.n_image_features

    @property
    def n_sections(self) -> int:
        """Number of sections (0 for a single-section model)."""
        return 0 if self.sections is None else len(self.sections)

    def gene_columns(self, adata: ad.AnnData) -> np.ndarray | None:
        """Positions of the model's genes in ``adata`` (``None`` if they are exactly its genes, in order)."""
        return _positions(adata, self.genes, "the model's {n} genes",
                          "pass data with the genes the model was trained on")

    def library_sizes(self, adata: ad.AnnData) -> np.ndarray:
        """Library size of each spot of ``adata``: its total count over the library genes, every value checked.

        The library genes are :attr:`library_genes` (the genes of the training data, when highly variable genes
        were selected) or else the model's genes; extra genes of ``adata`` are ignored. A spot without any count
        there is refused, except for binarised peaks (which have no size factor).
        """
        names = self.genes if self.library_genes is None else self.library_genes
        columns = _positions(adata, names, "the {n} genes that a spot's library size sums over",
                             "pass all the genes of the training data, not only the model's genes")
        where = f"layers['{self.layer}']" if self.layer else "adata.X"
        totals = np.zeros(adata.n_obs)
        for start, block in _checked_chunks(count_matrix(adata, self.layer), columns, where, not self.binarize):
            totals[start:start + block.shape[0]] = np.asarray(block.sum(axis=1)).ravel()
        empty = totals <= 0
        if empty.any() and not self.binarize:
            fix = f"remove them first with `adata = {_filter_hint(self.layer)}`" if len(names) == adata.n_vars \
                else "remove those spots from adata first"  # else filter_empty would count the other genes too
            raise ValueError(f"{where}: {int(empty.sum())} spot(s) (e.g. {list(adata.obs_names[empty][:3])}) have "
                             f"zero total count over the {len(names)} genes of their library size; {fix}")
        return totals

    def section_codes(self, labels) -> np.ndarray | None:
        """Section index of each spot from its section labels (``None`` for a single-section model)."""
        if self.sections is None:
            if labels is not None:
                raise ValueError("this model was fitted on a single section; give no section labels (sections=None)")
            return None
        if labels is None:
            raise ValueError(f"this model was fitted on {self.n_sections} sections ({self.batch_key}); give the "
                             f"section of each spot (one of {self.sections})")
        labels = pd.Series(np.asarray(labels).astype(str))
        unknown = sorted(set(labels) - set(self.sections))
        if unknown:
            raise ValueError(f"unknown section(s) {unknown[:5]}; the model knows {self.sections}")
        return pd.Categorical(labels, categories=self.sections).codes.astype(int)

    def _per_section(self, values: np.ndarray, codes: np.ndarray | None, inverse: bool) -> np.ndarray:
        """Apply each section's frame (or its inverse) to that section's rows."""
        values = np.asarray(values, dtype=np.float64)

        def apply(frame: LocationFrame, rows: np.ndarray) -> np.ndarray:
            return frame.inverse_transform(rows) if inverse else frame.transform(rows)

        if codes is None:
            return apply(self.frames[0], values)
        out = np.empty_like(values)
        for index, frame in enumerate(self.frames):
            out[codes == index] = apply(frame, values[codes == index])
        return out

    def scale_locations(self, locations: np.ndarray, codes: np.ndarray | None = None) -> np.ndarray:
        """Coordinates in the model's frame: each spot scaled with its section's fitted frame."""
        return self._per_section(locations, codes, inverse=False)

    def unscale_locations(self, scaled: np.ndarray, codes: np.ndarray | None = None) -> np.ndarray:
        """Inverse of :meth:`scale_locations`."""
        return self._per_section(scaled, codes, inverse=True)

    def gp_inputs(self, scaled: np.ndarray, codes: np.ndarray | None = None) -> np.ndarray:
        """GP inputs: scaled ``[x, y]``, followed by the one-hot section for a multi-section model."""
        if codes is None:
            return scaled
        return np.hstack([scaled, np.eye(self.n_sections)[codes]])

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        """Plain Python/NumPy values (for the model file)."""
        out = dataclasses.asdict(self)
        out["frames"] = [f.to_dict() for f in self.frames]
        return out

    @classmethod
    def from_dict(cls, values: dict) -> DataSetup:
        """Inverse of :meth:`to_dict`."""
        values = dict(values)
        values["frames"] = [LocationFrame.from_dict(frame) for frame in values["frames"]]
        return cls(**values)


# ---------------------------------------------------------------------- helpers of fit
def _safe_sd(sd: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """SDs with constant features (up to round-off) set to 1, so that they stay at 0 after z-scoring."""
    sd = np.array(sd, dtype=np.float64)
    sd[~(sd > 1e-10 * np.maximum(1.0, np.abs(mean)))] = 1.0
    return sd


def _filter_hint(layer: str | None) -> str:
    return f"spavae.data.filter_empty(adata, layer='{layer}')" if layer else "spavae.data.filter_empty(adata)"


def _positions(adata: ad.AnnData, names: list[str], what: str, fix: str) -> np.ndarray | None:
    """Positions of the genes ``names`` in ``adata`` (``None`` if they are exactly its genes, in order)."""
    var_names = pd.Index(adata.var_names)
    if len(var_names) == len(names) and (var_names == names).all():
        return None
    _unique_names(var_names, "gene", "adata.var_names_make_unique()")
    columns = var_names.get_indexer(names)
    missing = [g for g, c in zip(names, columns) if c < 0]
    if missing:
        raise ValueError(f"adata lacks {len(missing)} of {what.format(n=len(names))} (e.g. {missing[:5]}); {fix}")
    return columns


def _checked_chunks(matrix, columns: np.ndarray | None, where: str,
                    integer: bool) -> Iterator[tuple[int, sp.csr_matrix]]:
    """``(start, block)`` over row chunks of the matrix's ``columns`` (``None``: all), each checked to be counts."""
    for start, block in row_chunks(matrix):
        block = block if columns is None else block[:, columns]
        check_count_block(block, where=where, integer=integer, first_row=start)
        yield start, block


def _expression_statistics(matrix, columns: np.ndarray, binarize: bool, where: str, layer: str | None):
    """Checks and statistics in two streaming passes: library sizes over all genes, then per-gene mean/SD of the
    encoder input of the model's genes (``columns``). Returns the library sizes, their median, the mean and SD."""
    totals = np.zeros(matrix.shape[0])
    gene_totals = np.zeros(matrix.shape[1])
    for start, block in _checked_chunks(matrix, None, where, not binarize):
        totals[start:start + block.shape[0]] = np.asarray(block.sum(axis=1)).ravel()
        gene_totals += np.asarray(block.sum(axis=0)).ravel()
    empty_spots, empty_genes = int((totals <= 0).sum()), int((gene_totals[columns] <= 0).sum())
    if empty_spots or empty_genes:
        raise ValueError(f"{where} has {empty_spots} spot(s) and {empty_genes} gene(s) with zero total count; remove "
                         f"them first with `adata = {_filter_hint(layer)}` (it reports what it removes)")
    library_median = float(np.median(totals))
    n_spots, n_genes = matrix.shape[0], len(columns)
    sums, squares = np.zeros(n_genes), np.zeros(n_genes)
    for start, block in row_chunks(matrix):
        block = block[:, columns].astype(np.float64)
        if binarize:
            block.data = (block.data > 0).astype(np.float64)
        else:
            factors = totals[start:start + block.shape[0]] / library_median
            block.data = np.log1p(block.data / np.repeat(factors, np.diff(block.indptr)))
        sums += np.asarray(block.sum(axis=0)).ravel()
        squares += np.asarray(block.multiply(block).sum(axis=0)).ravel()
    mean = sums / n_spots
    variance = np.maximum(squares - n_spots * mean**2, 0.0) / max(n_spots - 1, 1)
    if binarize:  # spaPeakVAE: the binary matrix itself is the encoder input (no z-scoring)
        return totals, library_median, np.zeros(n_genes), np.ones(n_genes)
    return totals, library_median, mean, _safe_sd(np.sqrt(variance), mean)


def _kmeans_inducing(scaled: Sequence[np.ndarray], n_points: int, *, given: bool, seed: int = 0) -> list[np.ndarray]:
    """K-means inducing points of each section, ``n_points`` in all, shared in proportion to the sections' spots.

    Parameters
    ----------
    scaled
        Scaled locations of each section.
    n_points
        Number of inducing points of all sections together (one section of all the spots would get as many).
    given
        Whether the user gave ``n_points`` (``n_inducing``): then it is checked and kept exactly, each section
        getting at least one point. Otherwise it is the model's choice, capped at the number of spots, and each
        section gets at least :data:`MIN_SECTION_INDUCING` points (or as many as it has distinct locations).
    seed
        Seed of k-means and of the sample of at most 100,000 spots a section's centroids are fitted on.
    """
    n_spots = sum(len(section) for section in scaled)
    if given:
        if n_points > n_spots:
            raise ValueError(f"n_inducing must be an integer between 1 and the number of spots ({n_spots}), "
                             f"got {n_points}")
        if n_points < len(scaled):
            raise ValueError(f"n_inducing={n_points} is fewer than the {len(scaled)} sections; give at least one "
                             f"inducing point per section (n_inducing >= {len(scaled)})")
        floors = [1] * len(scaled)
    else:
        floors = [min(MIN_SECTION_INDUCING, len(np.unique(section, axis=0))) for section in scaled]
    counts = split_inducing([len(section) for section in scaled], min(n_points, n_spots), floors)
    points = []
    for section, count in zip(scaled, counts):
        sample = np.random.default_rng(seed).permutation(len(section))[:100_000]
        points.append(kmeans_inducing_points(section[sample], int(count), seed=seed,
                                             n_init=1 if len(sample) > 20_000 else 10))
    return points


def _section_names(adata: ad.AnnData, batch_key: str | None) -> list[str] | None:
    if batch_key is None:
        return None
    if batch_key not in adata.obs:
        raise KeyError(f"adata.obs has no column '{batch_key}' (batch_key); columns: {list(adata.obs.columns)}")
    labels = adata.obs[batch_key]
    if labels.isna().any():
        raise ValueError(f"obs['{batch_key}'] has {int(labels.isna().sum())} missing section label(s); fill them")
    names = sorted(set(labels.astype(str)))
    if len(names) < 2:
        raise ValueError(f"obs['{batch_key}'] has a single section; drop batch_key for one section")
    return names


def spot_locations(adata: ad.AnnData, spatial_key: str) -> np.ndarray:
    """``obsm[spatial_key]`` as a checked ``n_obs x 2`` float64 array."""
    if spatial_key not in adata.obsm:
        raise KeyError(f"adata.obsm has no '{spatial_key}' with spot coordinates (spatial_key=); "
                       f"keys: {list(adata.obsm.keys())}")
    values = adata.obsm[spatial_key]
    values = values.to_numpy() if isinstance(values, pd.DataFrame) else np.asarray(values)
    check_locations(values, adata.n_obs, where=f"obsm['{spatial_key}']")
    return values.astype(np.float64)


def protein_matrix(adata: ad.AnnData, protein_key: str | None) -> np.ndarray | None:
    """``obsm[protein_key]`` as checked spots x proteins counts (``None`` without proteins)."""
    if protein_key is None:
        return None
    if protein_key not in adata.obsm:
        raise KeyError(f"adata.obsm has no '{protein_key}' with protein counts (protein_key=); "
                       f"keys: {list(adata.obsm.keys())}")
    proteins = adata.obsm[protein_key]
    proteins = np.asarray(proteins.toarray() if hasattr(proteins, "toarray") else proteins, dtype=np.float64)
    if proteins.ndim != 2 or proteins.shape[0] != adata.n_obs:
        raise ValueError(f"obsm['{protein_key}'] must be spots x proteins, got shape {proteins.shape}")
    check_count_block(proteins, where=f"obsm['{protein_key}']", integer=True)
    return proteins

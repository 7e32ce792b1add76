"""Spatial domains from the latent: KMeans or Leiden (resolution searched), the number of domains chosen by
counting Leiden communities, refinement, scores (ALGORITHM 7.6) and scanpy-style colours.

:func:`cluster_domains` is the one pipeline (number of domains, clustering, refinement, scores) behind
:func:`find_domains`, ``spavae run``, ``spavae domains`` and ``spavae evaluate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import igraph
import leidenalg
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_hex
from scipy import sparse
from scipy.spatial import cKDTree
from sklearn.metrics import silhouette_score
from sklearn.neighbors import kneighbors_graph

from spavae.analysis._common import obsm_array, spot_coordinates
from spavae.analysis.clustering import NEIGHBOURS, cluster_kmeans, labelled_spots, refine_labels, score_clustering

METHODS = ("kmeans", "leiden")
DEFAULT_K_RANGE = range(3, 13)
SILHOUETTE_SAMPLE = 5000
"""Spots over which the silhouette is computed (a seeded subsample above this; its cost is quadratic)."""
AUTO_CRITERIA = ("leiden", "silhouette")
AUTO_RESOLUTION = 0.3
"""Leiden resolution of :func:`choose_n_domains`: the middle of the range (0.25-0.35) over which the community count
of the latent's 20-NN graph was within 1 of the reference number of domains on 6 or 7 of the 9 labelled sections of
the development panel (``benchmarks/results/n_domains_leiden.jsonl``)."""


def _leiden(graph: igraph.Graph, resolution: float, seed: int) -> np.ndarray:
    partition = leidenalg.find_partition(graph, leidenalg.RBConfigurationVertexPartition, weights="weight",
                                         resolution_parameter=resolution, n_iterations=-1, seed=seed)
    return np.asarray(partition.membership)


def latent_graph(latent: np.ndarray, n_neighbors: int = 20) -> igraph.Graph:
    """Undirected kNN graph of the latent rows (an edge when either row is among the other's nearest)."""
    latent = np.asarray(latent, dtype=np.float64)
    if not 1 <= n_neighbors < len(latent):
        raise ValueError(f"n_neighbors must be between 1 and n_spots - 1 = {len(latent) - 1}, got {n_neighbors}")
    knn = kneighbors_graph(latent, n_neighbors, include_self=False)
    upper = sparse.triu(((knn + knn.T) > 0).astype(np.float64), k=1).tocoo()
    graph = igraph.Graph(n=len(latent), edges=list(zip(upper.row.tolist(), upper.col.tolist())))
    graph.es["weight"] = upper.data.tolist()
    return graph


def _search_resolution(graph: igraph.Graph, n_domains: int, seed: int, max_runs: int,
                       history: list[tuple[float, int, int]]) -> tuple[np.ndarray, float] | None:
    """Double an upper bound on the resolution until it gives ``n_domains`` or more clusters, then bisect."""

    def run(resolution: float) -> tuple[np.ndarray, int]:
        labels = _leiden(graph, resolution, seed)
        history.append((resolution, seed, int(labels.max() + 1)))
        return labels, history[-1][2]

    low, high = 0.0, 1.0
    labels, found = run(high)
    for _ in range(max_runs):
        if found == n_domains:
            return labels, history[-1][0]
        if high - low < 1e-4:
            return None  # the count jumps over n_domains here
        if found < n_domains and history[-1][0] == high:
            low, high = high, 2 * high
            labels, found = run(high)
        else:
            middle = (low + high) / 2
            labels, found = run(middle)
            low, high = (middle, high) if found < n_domains else (low, middle)
    return None


def leiden_n_domains(latent: np.ndarray, n_domains: int, *, n_neighbors: int = 20, seed: int = 0,
                     n_seeds: int = 5, max_runs: int = 40) -> tuple[np.ndarray, float, int]:
    """Leiden clustering of the latent with the resolution searched to give exactly ``n_domains`` clusters.

    The number of Leiden clusters grows with the resolution, though not strictly: it can jump over the
    wanted number. The search doubles an upper bound until it is reached, then bisects (at most ``max_runs``
    Leiden runs); when the count jumps over ``n_domains`` it starts again with the next Leiden seed, up to
    ``n_seeds`` seeds. The original instead adds 0.001 to a Louvain resolution until the count is reached or
    passed, which needs hundreds of runs and may overshoot.

    Returns
    -------
    ``(labels, resolution, seed)``: the labels ``0..n_domains-1`` and the resolution and Leiden seed that gave them.
    """
    if not 2 <= n_domains < len(latent):
        raise ValueError(f"n_domains must be between 2 and n_spots - 1, got {n_domains}")
    graph = latent_graph(latent, n_neighbors)
    history: list[tuple[float, int, int]] = []  # (resolution, seed, number of clusters) of every run
    for leiden_seed in range(seed, seed + n_seeds):
        found = _search_resolution(graph, n_domains, leiden_seed, max_runs, history)
        if found is not None:
            return found[0], found[1], leiden_seed
    counts = sorted({c for _, _, c in history})
    raise ValueError(f"no Leiden resolution gave {n_domains} domains with seeds {seed}..{seed + n_seeds - 1} "
                     f"(cluster counts seen: {counts}); try other n_neighbors, more n_seeds, or method='kmeans'")


def spatial_coherence(labels: np.ndarray, locations: np.ndarray, *, n_neighbors: int = 6) -> float:
    """Chance-corrected agreement of each spot's label with those of its ``n_neighbors`` nearest spots.

    ``(observed - expected) / (1 - expected)``, where ``observed`` is the mean fraction of a spot's spatial
    neighbours that share its label and ``expected = sum_c p_c**2`` the same fraction for labels shuffled over the
    spots (``p_c`` the share of label ``c``): 1 for domains without a single disagreeing neighbour, about 0 for
    labels scattered at random, as Cohen's kappa.
    """
    labels = np.asarray(labels)
    locations = np.asarray(locations, dtype=np.float64)
    if locations.shape != (len(labels), 2):
        raise ValueError(f"locations must be n_spots x 2 = {(len(labels), 2)}, got shape {locations.shape}")
    if not 1 <= n_neighbors < len(labels):
        raise ValueError(f"n_neighbors must be between 1 and n_spots - 1 = {len(labels) - 1}, got {n_neighbors}")
    _, neighbours = cKDTree(locations).query(locations, k=n_neighbors + 1)
    observed = float((labels[neighbours[:, 1:]] == labels[:, None]).mean())
    _, counts = np.unique(labels, return_counts=True)
    expected = float(((counts / len(labels)) ** 2).sum())
    return 1.0 if expected == 1.0 else (observed - expected) / (1.0 - expected)


def count_leiden_communities(latent: np.ndarray, *, resolution: float = AUTO_RESOLUTION, n_neighbors: int = 20,
                             seed: int = 0) -> int:
    """The number of Leiden communities of the latent's ``n_neighbors``-NN graph at ``resolution``.

    Leiden (RB configuration model, the modularity of :func:`leiden_n_domains`) on :func:`latent_graph`; a graph of
    well separated groups of spots falls into one community per group, and within a group the resolution sets how
    much denser than chance a part must be to stand alone.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    return int(_leiden(latent_graph(latent, n_neighbors), resolution, seed).max() + 1)


def nearest_candidate(count: int, k_range: Sequence[int]) -> int:
    """The number of ``k_range`` nearest to ``count`` (the smaller on a tie): a community count brought into range."""
    return min(k_range, key=lambda k: (abs(k - count), k))


def choose_n_domains(latent: np.ndarray, locations: np.ndarray, *, k_range: Sequence[int] = DEFAULT_K_RANGE,
                     criterion: str = "leiden", n_neighbors: int = 20, n_init: int = 10,
                     seed: int = 0) -> tuple[int, pd.DataFrame]:
    """The number of domains of a section without labels: Leiden communities of the latent, within ``k_range``.

    ``criterion='leiden'`` (the default) counts the Leiden communities of the latent's ``n_neighbors``-NN graph at
    resolution 0.3 (:data:`AUTO_RESOLUTION`, :func:`count_leiden_communities`) and brings the count into
    ``k_range``. ``'silhouette'`` takes the ``k`` whose KMeans clustering has the highest mean silhouette, the rule
    GraphST's authors advise; on spavae's smooth latents it picks 3 or 4 on most sections, where the panel's
    references have 3 to 11 (docs/sizing.md). On the development panel (9 labelled sections, 3 seeds) the Leiden
    count is within 1 of the reference on 6 sections, the silhouette on 3, and KMeans at the chosen number has a
    mean ARI of 0.48 against 0.46; resolutions 0.25 to 0.35 all reach 6 or 7 sections, scanpy's default of 1 only 2
    (``benchmarks/n_domains.py``). The number of domains is a choice of granularity that no criterion can read off
    every tissue: read the table, and give the number when you know it.

    Whatever the criterion, every ``k`` in ``k_range`` is clustered by KMeans (``n_init`` restarts) and the table
    reports its mean silhouette (Euclidean, on the latent; over a seeded subsample of 5000 spots when there are more)
    and ``spatial_coherence`` (:func:`spatial_coherence`, 6 neighbours).

    Parameters
    ----------
    latent
        ``n_spots x d`` embedding (e.g. ``obsm['X_spavae']``).
    locations
        ``n_spots x 2`` coordinates for the spatial coherence (Visium array coordinates mapped with
        :func:`~spavae.analysis.visium_array_to_xy` first).
    k_range
        Candidate numbers of domains (each between 2 and ``n_spots - 1``); the default is 3 to 12.
    criterion
        ``'leiden'`` or ``'silhouette'`` (above).
    n_neighbors
        Neighbours of each spot in the latent graph of ``'leiden'``.
    n_init
        KMeans restarts per ``k``.
    seed
        Seed of Leiden, KMeans and the silhouette subsample.

    Returns
    -------
    ``(k, table)``: the chosen number and a table indexed by ``k`` with columns ``silhouette``,
    ``spatial_coherence`` and ``chosen``; with ``'leiden'``, ``table.attrs['leiden_communities']`` holds the count
    before it was brought into ``k_range``.
    """
    if criterion not in AUTO_CRITERIA:
        raise ValueError(f"criterion must be one of {AUTO_CRITERIA}, got {criterion!r}")
    latent = np.asarray(latent, dtype=np.float64)
    k_values = sorted({int(k) for k in k_range})
    if not k_values or k_values[0] < 2 or k_values[-1] >= len(latent):
        raise ValueError(f"k_range must hold numbers between 2 and n_spots - 1 = {len(latent) - 1}, "
                         f"got {list(k_range)}")
    sample = SILHOUETTE_SAMPLE if len(latent) > SILHOUETTE_SAMPLE else None
    rows = []
    for k in k_values:
        labels = cluster_kmeans(latent, k, n_init=n_init, seed=seed)
        silhouette = (silhouette_score(latent, labels, sample_size=sample, random_state=seed)
                      if len(np.unique(labels)) > 1 else np.nan)  # a latent with fewer distinct rows than k
        rows.append({"k": k, "silhouette": float(silhouette),
                     "spatial_coherence": spatial_coherence(labels, locations)})
    table = pd.DataFrame(rows).set_index("k")
    if table["silhouette"].isna().all():
        raise ValueError("KMeans found a single cluster for every k: the latent rows are (nearly) identical")
    if criterion == "silhouette":
        chosen = int(table["silhouette"].idxmax())
    else:
        count = count_leiden_communities(latent, n_neighbors=n_neighbors, seed=seed)
        chosen = nearest_candidate(count, k_values)
        table.attrs["leiden_communities"] = count
    table["chosen"] = table.index == chosen
    return chosen, table


def domain_colors(n_categories: int) -> list[str]:
    """``n_categories`` distinct hex colours: tab10 up to 10, tab20 up to 20 (as :mod:`spavae.plot`), else turbo."""
    if n_categories < 1:
        raise ValueError(f"n_categories must be >= 1, got {n_categories}")
    if n_categories <= 20:
        cmap = colormaps["tab10" if n_categories <= 10 else "tab20"]
        return [to_hex(cmap(i)) for i in range(n_categories)]
    return [to_hex(c) for c in colormaps["turbo"](np.linspace(0.0, 1.0, n_categories))]


def set_category_colors(adata: ad.AnnData, key: str) -> None:
    """Make ``obs[key]`` categorical and store one hex colour per category in ``uns[key + '_colors']``.

    The colours follow the category order, which is where ``scanpy.pl.spatial`` and
    ``squidpy.pl.spatial_scatter`` read them from. An existing categorical keeps its category order.
    """
    if key not in adata.obs:
        raise KeyError(f"adata.obs has no column '{key}'; columns: {list(adata.obs.columns)}")
    if not isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
        adata.obs[key] = pd.Categorical(adata.obs[key].astype(str))
    adata.uns[f"{key}_colors"] = domain_colors(len(adata.obs[key].cat.categories))


def write_domain_columns(adata: ad.AnnData, columns: dict[str, np.ndarray], n_domains: int) -> None:
    """Write domain labels (integers ``0 .. n_domains - 1``) as categorical ``obs`` columns with categories ``'0'``,
    ``'1'``, ... and one hex colour per category in ``uns[<column>_colors]`` (:func:`set_category_colors`)."""
    categories = [str(c) for c in range(n_domains)]
    for key, labels in columns.items():
        adata.obs[key] = pd.Categorical(np.asarray(labels).astype(str), categories=categories)
        set_category_colors(adata, key)


@dataclass
class Domains:
    """The spatial domains found by :func:`cluster_domains`.

    Attributes
    ----------
    labels
        The domain of each spot as clustered (integers ``0 .. n_domains - 1``).
    refined
        The domains after the neighbour-majority refinement (``None`` without refinement).
    n_domains
        The number of domains.
    chosen_by
        How it was chosen: ``'given'``, ``'labels'`` (the number of distinct labelled reference domains) or
        ``'leiden'`` (the Leiden communities of the latent, :func:`choose_n_domains`).
    selection
        With ``'leiden'``: the table of :func:`choose_n_domains` (silhouette and spatial coherence per ``k``; the
        community count in ``attrs['leiden_communities']``).
    scores
        ARI/NMI (:func:`~spavae.analysis.score_clustering`) of ``labels`` (key ``'labels'``) and of ``refined``
        (key ``'refined'``) against the reference labels on the labelled spots; ``None`` without reference labels
        or when none of the spots is labelled.
    resolution, leiden_seed
        Leiden only: the resolution and seed that gave ``n_domains`` clusters.
    """

    labels: np.ndarray
    refined: np.ndarray | None
    n_domains: int
    chosen_by: str
    selection: pd.DataFrame | None = None
    scores: dict[str, dict[str, float]] | None = None
    resolution: float | None = None
    leiden_seed: int | None = None


def cluster_domains(latent: np.ndarray, locations: np.ndarray | None, n_domains: int | str | None = None, *,
                    method: str = "kmeans", refine: str | None = None, truth=None, unlabeled: str = "NA",
                    n_neighbors: int = 20, n_init: int = 100, k_range: Sequence[int] = DEFAULT_K_RANGE,
                    seed: int = 0) -> Domains:
    """Cluster a latent into spatial domains, refine and score them: the pipeline of :func:`find_domains`,
    ``spavae run``, ``spavae domains`` and ``spavae evaluate``.

    1. The number of domains: ``n_domains`` when it is a number; ``'auto'``: the number of Leiden communities of
       the latent, brought into ``k_range`` (:func:`choose_n_domains`); ``None``: the number of distinct labelled
       reference domains when ``truth`` labels at least one spot, else ``'auto'``.
    2. The domains: KMeans with ``n_init`` restarts (``method='kmeans'``), or Leiden on a ``n_neighbors``-NN graph
       of the latent with the resolution searched to give ``n_domains`` clusters (``'leiden'``,
       :func:`leiden_n_domains`).
    3. With ``refine`` (``'hexagon'`` for Visium, ``'square'`` for ST): the neighbour-majority refinement
       (:func:`~spavae.analysis.refine_labels`).
    4. With ``truth``: ARI/NMI on the spots whose reference label is not ``unlabeled`` (or missing); no scores when
       there is no such spot.

    Parameters
    ----------
    latent
        ``n_spots x d`` embedding.
    locations
        ``n_spots x 2`` coordinates for the table of the automatic choice and the refinement (Visium array
        coordinates mapped with :func:`~spavae.analysis.visium_array_to_xy` first); may be ``None`` when neither is
        used.
    n_domains
        A number from 1 to ``n_spots - 1``, ``'auto'`` or ``None`` (see above).
    method, refine, n_neighbors, n_init, seed
        As above (``n_neighbors`` also for the automatic number of domains); ``seed`` seeds KMeans, Leiden and the
        silhouette subsample.
    truth, unlabeled
        Reference label of each spot (``None``: no scores), and the label of unannotated spots.
    k_range
        Candidate numbers of domains for ``'auto'`` (3 to 12).

    Returns
    -------
    The :class:`Domains`: labels, refined labels, the number of domains and how it was chosen, scores.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if refine is not None and refine not in NEIGHBOURS:
        raise ValueError(f"refine must be None or one of {sorted(NEIGHBOURS)}, got {refine!r}")
    latent = np.asarray(latent, dtype=np.float64)
    labelled = None
    if truth is not None:
        truth = np.asarray(truth, dtype=object)
        if truth.shape != (len(latent),):
            raise ValueError(f"truth must hold one label per spot ({len(latent)}), got shape {truth.shape}")
        labelled = labelled_spots(truth, unlabeled)
    chosen_by = "given"
    if n_domains is None:
        n_domains, chosen_by = (len(set(truth[labelled].astype(str))), "labels") \
            if labelled is not None and labelled.any() else ("auto", "leiden")
    elif n_domains == "auto":
        chosen_by = "leiden"
    elif not isinstance(n_domains, (int, np.integer)) or isinstance(n_domains, bool) \
            or not 1 <= n_domains < len(latent):
        raise ValueError(f"n_domains must be 'auto' or an integer from 1 to the number of spots - 1 "
                         f"({len(latent) - 1}), got {n_domains!r}")
    if locations is None and (n_domains == "auto" or refine is not None):
        raise ValueError("choosing the number of domains and refining them need the spot locations")
    selection = None
    if n_domains == "auto":
        n_domains, selection = choose_n_domains(latent, locations, k_range=k_range, n_neighbors=n_neighbors,
                                                seed=seed)
    resolution = leiden_seed = None
    if method == "kmeans":
        labels = cluster_kmeans(latent, n_domains, n_init=n_init, seed=seed)
    else:
        labels, resolution, leiden_seed = leiden_n_domains(latent, n_domains, n_neighbors=n_neighbors, seed=seed)
    refined = None if refine is None else refine_labels(labels, locations, shape=refine)
    scores = None
    if labelled is not None and labelled.any():
        scores = {name: score_clustering(truth, values, unlabeled=unlabeled)
                  for name, values in (("labels", labels), ("refined", refined)) if values is not None}
    return Domains(labels, refined, int(n_domains), chosen_by, selection, scores, resolution, leiden_seed)


def find_domains(adata: ad.AnnData, n_domains: int | str | None, *, method: str = "kmeans",
                 use_rep: str = "X_spavae", refine: str | None = None, spatial_key: str = "spatial",
                 visium_array: bool = False, truth_key: str | None = None, unlabeled: str = "NA",
                 n_neighbors: int = 20, n_init: int = 100, k_range: Sequence[int] = DEFAULT_K_RANGE, seed: int = 0,
                 key_added: str = "spavae_domains", copy: bool = False) -> ad.AnnData | None:
    """Cluster the latent into ``n_domains`` spatial domains and write them to ``adata.obs[key_added]``.

    The domains (:func:`cluster_domains`) are a categorical column (categories ``'0'``, ``'1'``, ...) with one hex
    colour per category in ``uns[key_added + '_colors']``, so ``scanpy.pl.spatial(adata, color=key_added)`` and
    ``squidpy.pl.spatial_scatter`` draw them as they are.

    Parameters
    ----------
    adata
        AnnData with the latent in ``obsm[use_rep]`` (e.g. after :meth:`~spavae.SpaVAE.write_results`).
    n_domains
        Number of domains wanted, or ``'auto'``: the number of Leiden communities of the latent brought into
        ``k_range`` (:func:`choose_n_domains`); its table (silhouette, and spatial coherence on
        ``obsm[spatial_key]``) goes to ``uns[key_added]['selection']``.
        ``None``: the number of distinct labelled domains of ``obs[truth_key]`` when it labels a spot, else
        ``'auto'``.
    method
        * ``'kmeans'``: KMeans with ``n_init`` restarts (the original's default for DLPFC);
        * ``'leiden'``: Leiden on a ``n_neighbors``-NN graph of the latent, resolution searched by
          :func:`leiden_n_domains` to give exactly ``n_domains`` clusters.
    use_rep
        ``obsm`` key of the latent.
    refine
        ``None``, ``'hexagon'`` (Visium) or ``'square'`` (ST): the neighbour-majority refinement of
        :func:`~spavae.analysis.refine_labels` on ``obsm[spatial_key]``. The unrefined labels are kept in
        ``obs[key_added + '_unrefined']``.
    spatial_key, visium_array
        Coordinates for the refinement; with ``visium_array`` they are Visium ``(array_row, array_col)`` and
        are mapped to the hexagonal lattice first.
    truth_key
        Optional ``obs`` column with reference labels: ARI/NMI (spots labelled ``unlabeled`` left out) go to
        ``adata.uns[key_added]['scores']`` when at least one spot is labelled.
    unlabeled
        The reference label of unannotated spots.
    n_neighbors, n_init, seed
        Neighbours in the latent graph (of Leiden and of the automatic number of domains), KMeans restarts, and the
        seed of both.
    k_range
        Candidate numbers of domains for ``n_domains='auto'`` (3 to 12).
    key_added
        ``obs`` column of the domains; parameters, the number of domains and how it was chosen
        (``n_domains_chosen_by``: ``'given'``, ``'labels'`` or ``'leiden'``) and the Leiden resolution and seed
        go to ``uns[key_added]``.
    copy
        Work on and return a copy of ``adata``.

    Returns
    -------
    The copy when ``copy=True``, else ``None``.
    """
    if truth_key is not None and truth_key not in adata.obs:
        raise KeyError(f"adata.obs has no column '{truth_key}'; columns: {list(adata.obs.columns)}")
    latent = obsm_array(adata, use_rep, hint="the latent; write it with model.write_results(adata)")
    locations = None
    if refine is not None or n_domains is None or n_domains == "auto":
        locations = spot_coordinates(adata, spatial_key, visium_array)
    result = cluster_domains(latent, locations, n_domains, method=method, refine=refine,
                             truth=None if truth_key is None else adata.obs[truth_key].astype(object).to_numpy(),
                             unlabeled=unlabeled, n_neighbors=n_neighbors, n_init=n_init, k_range=k_range, seed=seed)
    adata = adata.copy() if copy else adata
    columns = {key_added: result.labels} if result.refined is None else \
        {f"{key_added}_unrefined": result.labels, key_added: result.refined}
    write_domain_columns(adata, columns, result.n_domains)
    info: dict = {"params": {"n_domains": n_domains, "method": method, "use_rep": use_rep, "refine": refine,
                             "visium_array": visium_array, "n_neighbors": n_neighbors, "n_init": n_init,
                             "seed": seed},
                  "n_domains": result.n_domains, "n_domains_chosen_by": result.chosen_by}
    if result.selection is not None:
        table = result.selection
        info["params"]["k_range"] = [int(k) for k in table.index]
        info["selection"] = {"rule": "leiden", "leiden_communities": int(table.attrs["leiden_communities"]),
                             "k": [int(k) for k in table.index],
                             "silhouette": table["silhouette"].tolist(),
                             "spatial_coherence": table["spatial_coherence"].tolist()}
    if result.resolution is not None:
        info["resolution"], info["leiden_seed"] = result.resolution, result.leiden_seed
    if result.scores is not None:
        names = {"labels": f"{key_added}_unrefined" if result.refined is not None else key_added,
                 "refined": key_added}
        info["scores"] = {names[name]: score for name, score in result.scores.items()}
    adata.uns[key_added] = info
    return adata if copy else None

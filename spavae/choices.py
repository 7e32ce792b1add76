"""The size of a model, said in words: what :class:`~spavae.SpaVAE` chose for a section and why.

:func:`describe_choices` turns a built model into one line per choice (genes, encoder input, inducing points, latent
dimensions, networks, image view), each with the rule or setting behind it. ``spavae run`` prints them before training.
"""

from __future__ import annotations

import numpy as np

from spavae.api import MODULE_DEFAULTS, SpaVAE
from spavae.data.input_axes import AUTO_GENES_PER_SPOT
from spavae.data.setup import AUTO_GENES_THRESHOLD, AUTO_TOP_GENES, GRID_MAX_SPOTS, SMALL_SECTION_SPOTS


def describe_choices(model: SpaVAE) -> list[str]:
    """One line per sizing choice of ``model``: what it is and the reason (a rule of the defaults or a setting).

    Parameters
    ----------
    model
        A built (trained or not) :class:`~spavae.SpaVAE`.

    Returns
    -------
    Lines starting with ``genes:``, ``encoder input:``, ``inducing points:``, ``latent:``, ``networks:`` and, with
    the image view, ``image:``.
    """
    params, setup = model.init_params, model.setup
    lines = [f"genes: {_genes(params.get('n_top_genes'), setup)}",
             f"encoder input: {_encoder_input(params.get('input_axes'), setup, len(model.data))}"]
    inducing, method = params.get("inducing"), setup.inducing_method
    points = setup.inducing_points
    if method == "grid" and not setup.n_sections:
        placed = f"a {len(np.unique(points[:, 0]))} x {len(np.unique(points[:, 1]))} grid over the section"
    else:
        placed = {"grid": "a grid over each section", "kmeans": "k-means centroids of the spots"}.get(method, "placed")
    if inducing == "auto":
        reason = (f"inducing='auto': a grid up to {GRID_MAX_SPOTS:,} spots" if method == "grid" else
                  f"inducing='auto': one per 500 spots (49 to 300) above {GRID_MAX_SPOTS:,} spots")
    else:
        reason = f"inducing={inducing!r}"
    if method == "grid":
        steps = params.get("inducing_steps")
        reason += f"; inducing_steps={steps}" if steps is not None else \
            f"; 13 x 13 on a section of up to {SMALL_SECTION_SPOTS:,} spots, 7 x 7 above"
    lines.append(f"inducing points: {len(setup.inducing_points)}, {placed}{_per_section(setup)} ({reason})")
    module = model.module
    lines.append(f"latent: {module.n_gp} GP + {module.n_gauss} Gaussian dimensions "
                 f"({_setting(params, 'n_gp')}, {_setting(params, 'n_gauss')})")
    lines.append(f"networks: encoder {list(params['encoder_layers'])}, decoder {list(params['decoder_layers'])}, "
                 f"dropout {params['dropout']:g} ({'defaults' if _defaults(params) else 'as given'})")
    if setup.image is not None:
        settings = setup.image["settings"]
        source = ", ".join(f"{key}={value}" for key, value in settings["source"].items())
        masked = int(np.isnan(model.data.image_features).any(1).sum())
        size = f", {settings['diameter_px']:.1f} px per spot" if "diameter_px" in settings else ""
        lines.append(f"image: {setup.n_image_features} {settings['extractor']} features per spot from {source}{size} "
                     f"(image_weight={params['image_weight']:g}); {masked} of {len(model.data)} spots without usable "
                     "features (off the image or on background) are left out of the image likelihood")
    return lines


def _genes(n_top_genes, setup) -> str:
    selection = setup.gene_selection
    if selection is not None:
        why = (f"n_top_genes='auto': the input has {selection['n_input_genes']:,} genes, more than "
               f"{AUTO_GENES_THRESHOLD:,}, a whole transcriptome" if n_top_genes == "auto" else
               f"n_top_genes={n_top_genes}")
        return f"{setup.n_genes:,} highly variable of {selection['n_input_genes']:,} ({why})"
    why = (f"n_top_genes='auto': {AUTO_GENES_THRESHOLD:,} genes or fewer, a targeted panel, are kept whole"
           if n_top_genes == "auto" else "n_top_genes=None" if n_top_genes is None else
           f"n_top_genes={n_top_genes} is at least the number of genes")
    kept = f"all {setup.n_genes:,}"
    return f"{kept} ({why}; {AUTO_TOP_GENES:,} highly variable genes are kept above)" \
        if n_top_genes == "auto" else f"{kept} ({why})"


def _encoder_input(input_axes, setup, n_spots: int) -> str:
    read = "the genes" if setup.input_axes is None else \
        f"{setup.n_gene_input} principal axes of the z-scored genes"
    if input_axes != "auto":
        return f"{read} (input_axes={input_axes!r})"
    if setup.binarize:
        return f"{read} (input_axes='auto': binarised peaks are read as they are)"
    ratio = setup.n_genes / n_spots
    side = f"more than {AUTO_GENES_PER_SPOT:g}" if setup.input_axes is not None else \
        f"{AUTO_GENES_PER_SPOT:g} or fewer"
    return f"{read} (input_axes='auto': {ratio:.2g} genes per spot, {side})"


def _per_section(setup) -> str:
    return f" over {setup.n_sections} sections" if setup.n_sections else ""


def _setting(params: dict, name: str) -> str:
    return f"{name}={params[name]}, {'the default' if params[name] == MODULE_DEFAULTS[name] else 'as given'}"


def _defaults(params: dict) -> bool:
    return all(tuple(params[name]) == tuple(MODULE_DEFAULTS[name]) for name in ("encoder_layers", "decoder_layers")) \
        and params["dropout"] == MODULE_DEFAULTS["dropout"]

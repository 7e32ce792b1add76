"""Active latent dimensions: the variance across spots of the posterior mean against a hand computation (the line
and metrics of ``spavae run`` are checked in test_cli_analyses.py, on its trained run)."""

from __future__ import annotations

import numpy as np
import pytest

from spavae.analysis import active_dimensions
from spavae.analysis.latent_activity import describe_active_dimensions


def test_a_dimension_is_active_when_its_posterior_mean_varies_across_spots_by_more_than_the_bound():
    rng = np.random.default_rng(0)
    spread = np.array([2.0, 0.2, 0.05, 0.0])  # variances about 4, 0.04, 0.0025, 0
    latent = rng.normal(size=(500, 4)) * spread + np.array([1.0, -3.0, 5.0, 0.5])  # offsets do not count
    by_hand = ((latent - latent.sum(0) / len(latent)) ** 2).sum(0) / len(latent)
    assert list(active_dimensions(latent)) == list(by_hand > 0.01) == [True, True, False, False]
    assert list(active_dimensions(latent, threshold=0.001)) == [True, True, True, False]


def test_the_line_counts_gp_and_gaussian_dimensions_apart():
    active = np.array([True, True, False, True, False, False])
    assert describe_active_dimensions(active, 2).startswith(
        "latent used: 3 of 6 dimensions active (2 of 2 GP, 1 of 4 Gaussian; ")


@pytest.mark.parametrize("latent,threshold,match", [(np.zeros(5), 0.01, "n_spots x d"),
                                                    (np.zeros((1, 3)), 0.01, "at least 2 spots"),
                                                    (np.zeros((4, 3)), 0.0, "threshold must be positive")])
def test_bad_input_is_refused_in_one_line(latent, threshold, match):
    with pytest.raises(ValueError, match=match):
        active_dimensions(latent, threshold=threshold)

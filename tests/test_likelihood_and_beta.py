"""The NB likelihood against scipy and the PI controller against the original's test vectors."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

from spavae.beta import PIController
from spavae.likelihoods import GeneNegativeBinomial, NegativeBinomialObservation, nb_log_prob, negative_binomial
from spavae.model import Batch


def test_nb_matches_scipy_and_the_epsilon_form():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 60, size=200).astype(float)
    mu = rng.uniform(0.1, 40, size=200)
    theta = rng.uniform(0.2, 20, size=200)
    expected = stats.nbinom.logpmf(y, theta, theta / (theta + mu))
    eps_form = nb_log_prob(torch.tensor(y), torch.tensor(mu), torch.tensor(theta)).numpy()
    np.testing.assert_allclose(eps_form, expected, rtol=1e-7, atol=1e-7)
    assert -nb_log_prob(torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64),
                        torch.tensor(1.7, dtype=torch.float64)).item() == pytest.approx(2.1272013, abs=1e-6)


def test_likelihood_module_uses_size_factors_and_gene_dispersion():
    lik = NegativeBinomialObservation(3, 2).double()
    lik.raw_dispersion.data = torch.tensor([0.0, 1.0, 20.0], dtype=torch.float64)  # 20 is clamped to 15
    mean = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    sf = torch.tensor([2.0, 0.5], dtype=torch.float64)
    counts = torch.tensor([[1.0, 4.0, 6.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    theta = np.exp([0.0, 1.0, 15.0])
    mu = mean.numpy() * sf.numpy()[:, None]
    expected = stats.nbinom.logpmf(counts.numpy(), theta, theta / (theta + mu)).sum(1)
    batch = Batch(None, None, counts, sf)
    np.testing.assert_allclose(lik.distribution(mean, batch).log_prob(counts).detach().numpy(), expected, rtol=1e-6)
    assert lik.distribution(mean, batch).mean.detach().numpy() == pytest.approx(mu)


def test_controller_vectors_from_the_original():
    c = PIController(0.25)
    assert [round(c.step(2.24), 6) for _ in range(6)] == [10.05475, 10.1045, 10.15425, 10.204, 10.25375, 10.3035]
    c = PIController(0.25)
    assert [round(c.update(k), 6) for k in (1.0, 0.5, 0.25, 0.1, 0.0)] == [
        10.02352, 10.027773, 10.025, 10.019458, 10.012227]


def test_controller_windup_and_lower_freeze():
    c = PIController(0.25, beta_init=24.9)
    out = [c.update(0.5) for _ in range(20)]
    assert out[-1] == 25.0 and c.state == pytest.approx(25.027773, abs=1e-6)
    assert [round(c.update(0.0), 6) for _ in range(5)] == [25.0, 25.0, 25.0, 24.997227, 24.990977]
    low = PIController(0.25, beta_init=3.0)  # below beta_min: the integral step is frozen
    low.update(0.0)
    assert low.state == pytest.approx(3.0 + 0.01 * (1 / (1 + np.exp(1.25)) - 0.5))
    assert low.beta == 4.0


def test_controller_window_and_state_roundtrip():
    c = PIController(0.25, window=3)
    for k in (1.0, 2.0, 3.0, 4.0):
        c.step(k)
    assert list(c.history) == [3.0, 4.0]
    clone = PIController(0.25, window=3)
    clone.load_state_dict(c.state_dict())
    assert clone.step(0.5) == c.step(0.5)
    with pytest.raises(ValueError, match="beta_min"):
        PIController(0.25, beta_min=5, beta_max=4)


def test_gene_negative_binomial_equals_the_expanded_one_and_scipy():
    """The zero-count shortcut (log-gamma terms only at nonzero counts) changes no value and no gradient."""

    generator = torch.Generator().manual_seed(0)
    mean = torch.rand(6, 4, dtype=torch.float64, generator=generator) * 5 + 0.01
    for theta in (torch.rand(4, dtype=torch.float64, generator=generator) + 0.1,
                  torch.rand(6, 4, dtype=torch.float64, generator=generator) + 0.1):
        theta.requires_grad_(True)
        counts = torch.poisson(mean, generator=generator)
        counts[0], counts[1, :2] = 0.0, 0.0  # a spot without counts and zeros among nonzero counts
        assert (counts > 0).any() and (counts[1:] == 0).any()
        mean.requires_grad_(True)
        fast = GeneNegativeBinomial(mean, theta).log_prob(counts)
        slow = negative_binomial(mean, theta.expand_as(mean)).log_prob(counts)
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
        # nonzero positions read off the sparse rows (as a mini-batch carries them): the same values
        rows = sp.csr_matrix(counts.numpy())
        positions = torch.from_numpy(np.repeat(np.arange(6), np.diff(rows.indptr)) * 4 + rows.indices)
        known = GeneNegativeBinomial(mean, theta, (counts, positions))
        torch.testing.assert_close(known.log_prob(counts), slow, rtol=1e-12, atol=1e-12)
        other = counts.flip(0)  # another tensor: its own nonzero entries are searched, the known ones ignored
        torch.testing.assert_close(known.log_prob(other), negative_binomial(mean, theta.expand_as(mean)).log_prob(other),
                                   rtol=1e-12, atol=1e-12)
        expected = stats.nbinom.logpmf(counts.numpy(), theta.detach().expand_as(mean).numpy(),
                                             (theta / (theta + mean)).detach().numpy())
        np.testing.assert_allclose(fast.detach().numpy(), expected, rtol=1e-10)
        grads_fast = torch.autograd.grad(fast.sum(), (theta, mean))
        grads_slow = torch.autograd.grad(slow.sum(), (theta, mean))
        for grad_fast, grad_slow in zip(grads_fast, grads_slow):
            torch.testing.assert_close(grad_fast, grad_slow, rtol=1e-10, atol=1e-12)
        mean = mean.detach()


def _nonzero_positions(counts: torch.Tensor) -> torch.Tensor:
    """Flat positions (``row * width + column``) of the nonzero entries, read off CSR rows as the data layer does."""
    rows = sp.csr_matrix(counts.numpy())
    return torch.from_numpy(np.repeat(np.arange(counts.shape[0]), np.diff(rows.indptr)) * counts.shape[1] + rows.indices)


@pytest.mark.parametrize("layout", ["whole block", "partial block", "block elsewhere", "proteins",
                                    "genes and proteins"])
def test_nb_observation_takes_the_batch_positions_only_for_the_tensor_it_scores(layout):
    """The batch's gene_nonzero positions are those of its gene block: they spare the search when an NB observation
    scores that whole block, and an observation that scores a part of it (columns [0, 3) of 6), a block starting
    elsewhere (columns [3, 6)) or genes and proteins read as one block searches; the genes of a batch with proteins
    (counts = 6 genes + 2 proteins) are the gene block and take them. Either way, the log-probabilities and
    gradients are those of the searching path."""
    generator = torch.Generator().manual_seed(3)
    genes = torch.poisson(torch.rand(5, 6, dtype=torch.float64, generator=generator) * 3, generator=generator)
    genes[0, :3], genes[1, 3:] = 0.0, 0.0  # spots whose only nonzero counts lie outside one of the blocks
    columns = {"partial block": slice(0, 3), "block elsewhere": slice(3, 6),
               "genes and proteins": slice(0, 8)}.get(layout, slice(0, 6))
    counts = genes
    if layout in ("proteins", "genes and proteins"):
        counts = torch.cat([genes, torch.poisson(torch.full((5, 2), 20.0, dtype=torch.float64), generator=generator)], 1)
    observation = NegativeBinomialObservation(columns.stop - columns.start, 2, columns=columns).double()
    mean = (torch.rand(5, columns.stop - columns.start, dtype=torch.float64, generator=generator) * 4 + 0.1)
    mean.requires_grad_(True)
    size_factors = torch.rand(5, dtype=torch.float64, generator=generator) + 0.5
    values, grads = [], []
    for positions in (_nonzero_positions(genes), None):  # the batch's positions, then the search
        batch = Batch(None, None, counts, size_factors, gene_nonzero=positions, gene_width=6)
        observed = observation.observed(batch)
        distribution = observation.distribution(mean, batch, observed)
        takes_positions = distribution.base_dist.observed_nonzero is not None
        assert takes_positions == (positions is not None and layout in ("whole block", "proteins"))
        log_prob = distribution.log_prob(observed)
        values.append(log_prob.detach())
        grads.append(torch.autograd.grad(log_prob.sum(), (mean, observation.raw_dispersion)))
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=1e-12)
    for known, searched in zip(*grads):
        torch.testing.assert_close(known, searched, rtol=1e-12, atol=1e-12)

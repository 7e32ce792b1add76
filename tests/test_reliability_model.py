"""Reliability of the module (issue 10): several latent samples encode once, and two models in one session keep
their own parameters (Pyro's global parameter store is not cleared between these tests)."""

import copy

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

import spavae
from test_model import make_batch, make_module, reference_nb, reference_posterior

D = torch.float64


def bn_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Running statistics of every BatchNorm layer of ``module``."""
    return {name: buffer.clone() for name, buffer in module.named_buffers() if "running" in name or "batches" in name}


def test_several_samples_encode_and_condition_the_gp_once(monkeypatch):
    module, batch = make_module(), make_batch()
    module.train()
    one_pass = copy.deepcopy(module)
    encoder_calls, gp_calls = [], []
    module.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    condition_on = module.gp.condition_on
    monkeypatch.setattr(module.gp, "condition_on", lambda *a, **k: gp_calls.append(1) or condition_on(*a, **k))
    module.loss(batch, beta=10.0, num_samples=3)
    assert (len(encoder_calls), len(gp_calls)) == (1, 1)
    one_pass.encoder(batch.expression)  # the encoder's BatchNorm statistics move exactly as in one forward pass
    got, want = bn_buffers(module.encoder), bn_buffers(one_pass.encoder)
    assert set(got) == set(want) and len(got) == 6
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_kl_terms_do_not_depend_on_the_number_of_samples():
    """With dropout the encoder output is random: the KL must come from the one encoding of the batch."""
    module, batch = make_module(dropout=0.3), make_batch()
    module.train()
    torch.manual_seed(4)
    one = module.loss(batch, beta=10.0, num_samples=1)
    torch.manual_seed(4)
    three = module.loss(batch, beta=10.0, num_samples=3)
    for part in ("kl_gp", "kl_gauss", "gp_cross_entropy", "gp_evidence"):
        assert getattr(three, part).item() == getattr(one, part).item(), part


def test_reconstruction_is_the_average_over_independent_draws():
    module, batch = make_module(), make_batch()
    module.train()
    reference = copy.deepcopy(module)
    torch.manual_seed(11)
    out = module.loss(batch, beta=12.5, num_samples=3)
    mean, var, kl_gp, kl_gauss = reference_posterior(reference, batch)
    torch.manual_seed(11)  # the loss draws z_gp then z_gauss for each sample in turn
    draws = [torch.cat([torch.empty(40, 2, dtype=D).normal_(), torch.empty(40, 3, dtype=D).normal_()], 1)
             for _ in range(3)]
    nbs = [reference_nb(reference, batch, mean, var, eps).item() for eps in draws]
    assert len(set(nbs)) == 3  # three different draws
    assert out.nb.item() == pytest.approx(np.mean(nbs), rel=1e-9)
    assert (out.kl_gp.item(), out.kl_gauss.item()) == pytest.approx((kl_gp.item(), kl_gauss.item()), rel=1e-6)
    assert out.loss.item() == pytest.approx(np.mean(nbs) + 12.5 * (kl_gp + kl_gauss).item(), rel=1e-6)
    # each draw went through the decoder once, as in the original: its BatchNorm saw three batches
    got, want = bn_buffers(module.decoder), bn_buffers(reference.decoder)
    assert want["trunk.1.num_batches_tracked"].item() == 3
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=1e-9, msg=name)


# ---------------------------------------------------------------------- two models in one session
def fit(adata, seed: int) -> spavae.SpaVAE:
    model = spavae.SpaVAE(adata, device="cpu", encoder_layers=(16, 8), decoder_layers=(16,), seed=seed)
    return model.train(max_epochs=1, progress=False)


def same_weights(a: spavae.SpaVAE, b: spavae.SpaVAE) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values()))


def svi_step(model: spavae.SpaVAE) -> None:
    """One step of Pyro's own SVI with Trace_ELBO on the module's model and guide."""
    svi = SVI(model.module.model, model.module.guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    model.module.train()
    svi.step(*model.data.batch(torch.arange(64)).args(), beta=10.0)


def test_two_models_in_one_session_keep_their_own_parameters(small_adata):
    pyro.clear_param_store()
    alone = fit(small_adata, seed=2)
    pyro.clear_param_store()
    first = fit(small_adata, seed=1)
    second = fit(small_adata, seed=2)  # no clearing in between
    assert same_weights(second, alone) and not same_weights(second, first)
    columns = [c for c in alone.history if c != "seconds"]
    assert alone.history[columns].equals(second.history[columns])

    # training does not put the parameters into Pyro's global store (nothing is kept alive there)
    stored = {id(value) for value in pyro.get_param_store().values()}
    for model in (first, second):
        assert not any(id(p) in stored for p in model.module.parameters())

    # Pyro users: each module's guide registers its own parameters, and SVI steps only that module
    batch = second.data.batch(torch.arange(64))
    for model, other in ((second, first), (first, second)):
        trace = poutine.trace(model.module.guide).get_trace(*batch.args())
        params = {id(site["value"]) for site in trace.nodes.values() if site["type"] == "param"}
        assert params == {id(p) for p in model.module.parameters() if p.requires_grad}
        before, untouched = copy.deepcopy(model.module.state_dict()), copy.deepcopy(other.module.state_dict())
        svi_step(model)
        assert not torch.equal(model.module.decoder.head.weight, before["observations.0.decoder.head.weight"])
        for key, value in other.module.state_dict().items():
            assert torch.equal(value, untouched[key]), key

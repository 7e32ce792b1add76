"""Kernels against their formulas and against GPyTorch's RQ/RBF kernels."""

import math

import pytest
import torch
from gpytorch.kernels import RBFKernel, RQKernel

from spavae.gp import CauchyKernel, EQKernel, make_kernel

D = torch.float64


def test_values_at_known_distances():
    x1 = torch.zeros(1, 2, dtype=torch.float64)
    x2 = torch.tensor([[math.sqrt(20.0), 0.0]], dtype=torch.float64)  # d^2 = 20
    assert CauchyKernel(20.0, fixed=True).double()(x1, x2).to_dense().item() == pytest.approx(0.5, abs=1e-12)
    assert EQKernel(20.0, fixed=True).double()(x1, x2).to_dense().item() == pytest.approx(math.exp(-1), abs=1e-12)


def test_original_scale_parameterisation():
    kernel = CauchyKernel(20.0).double()
    assert kernel.raw_scale.item() == 20.0
    assert kernel.scale.item() == pytest.approx(20.000000002061, abs=1e-11)
    assert kernel.raw_scale.requires_grad
    fixed = CauchyKernel(7.5, fixed=True)
    assert fixed.scale.item() == 7.5
    assert not any(p.requires_grad for p in fixed.parameters())
    kernel.raw_scale.data.fill_(-1e3)
    assert kernel.scale.item() == pytest.approx(1e-10)  # clamped at the lower bound


@pytest.mark.parametrize("cls,profile", [(CauchyKernel, lambda u: 1 / (1 + u)), (EQKernel, lambda u: torch.exp(-u))])
def test_matrix_diag_and_formula(cls, profile):
    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.rand(7, 2, generator=gen, dtype=D) * 20, torch.rand(5, 2, generator=gen, dtype=D) * 20
    kernel = cls(13.0).double()
    s = torch.nn.functional.softplus(torch.tensor(13.0, dtype=D))
    expected = profile(((x1[:, None, :] - x2[None, :, :]) ** 2).sum(-1) / s)
    torch.testing.assert_close(kernel(x1, x2).to_dense(), expected)
    torch.testing.assert_close(kernel(x1, diag=True), torch.ones(7, dtype=D))
    torch.testing.assert_close(kernel(x1, x1[[1, 2, 3, 4, 5, 6, 0]], diag=True),
                               profile(((x1 - x1[[1, 2, 3, 4, 5, 6, 0]]) ** 2).sum(-1) / s))


def test_batch_shape_gives_one_scale_per_dimension():
    kernel = CauchyKernel(10.0, batch_shape=torch.Size([3])).double()
    kernel.raw_scale.data = torch.tensor([5.0, 10.0, 20.0], dtype=D).view(3, 1, 1)
    x = torch.rand(4, 2, dtype=D) * 10
    out = kernel(x).to_dense()
    assert out.shape == (3, 4, 4)
    for i in range(3):
        torch.testing.assert_close(out[i], CauchyKernel(float(kernel.raw_scale[i].detach())).double().forward(x, x))
    assert kernel(x, diag=True).shape == (3, 4)


def test_equivalence_with_gpytorch_rq_and_rbf():
    x1, x2 = torch.rand(6, 2, dtype=D) * 20, torch.rand(4, 2, dtype=D) * 20
    scale = 20.0
    cauchy = CauchyKernel(scale, fixed=True).double()
    rq = RQKernel().double()
    rq.alpha = 1.0
    rq.lengthscale = math.sqrt(scale / 2)  # s = 2 l^2
    torch.testing.assert_close(cauchy(x1, x2).to_dense(), rq(x1, x2).to_dense())
    rbf = RBFKernel().double()
    rbf.lengthscale = math.sqrt(scale / 2)
    torch.testing.assert_close(EQKernel(scale, fixed=True).double()(x1, x2).to_dense(), rbf(x1, x2).to_dense())


def test_gradient_reaches_the_scale():
    kernel = CauchyKernel(20.0)
    x = torch.rand(5, 2) * 20
    kernel(x).to_dense().sum().backward()
    assert kernel.raw_scale.grad is not None and kernel.raw_scale.grad.abs().item() > 0


def test_make_kernel():
    assert isinstance(make_kernel("Cauchy"), CauchyKernel)
    assert isinstance(make_kernel("rbf"), EQKernel)
    rq = RQKernel()
    assert make_kernel(rq) is rq
    with pytest.raises(ValueError, match="unknown kernel 'matern'"):
        make_kernel("matern")
    with pytest.raises(ValueError, match="must be positive"):
        CauchyKernel(-1.0)

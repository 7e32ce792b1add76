r"""Cauchy and EQ (RBF) kernels of spaVAE as GPyTorch kernels (ALGORITHM section 2).

Both act on the squared distance :math:`d^2` and one scale :math:`s` with no output scale:

.. math::
    k_\mathrm{Cauchy}(x, y) = \frac{1}{1 + d^2 / s}, \qquad k_\mathrm{EQ}(x, y) = \exp(-d^2 / s).

With GPyTorch's conventions Cauchy is ``RQKernel(alpha=1)`` and EQ is ``RBFKernel`` with
:math:`s = 2\ell^2`. The scale uses the original parameterisation: a raw parameter :math:`r` initialised
to ``scale`` and :math:`s = \mathrm{clamp}(\mathrm{softplus}(r), 10^{-10}, 10^4)`. With ``fixed=True``
the scale is exactly ``scale`` and not trained.
"""

from __future__ import annotations

import torch
from gpytorch.kernels import Kernel

SCALE_MIN, SCALE_MAX = 1e-10, 1e4


class _SquaredDistanceKernel(Kernel):
    """Base class: a profile of ``d^2 / s`` with the original spaVAE scale parameterisation."""

    has_lengthscale = False

    def __init__(self, scale: float = 20.0, *, fixed: bool = False, batch_shape: torch.Size = torch.Size([]), **kwargs):
        super().__init__(batch_shape=batch_shape, **kwargs)
        if not scale > 0:
            raise ValueError(f"kernel scale must be positive, got {scale}")
        self.fixed = fixed
        initial = torch.full((*self.batch_shape, 1, 1), float(scale), dtype=torch.float64)
        if fixed:  # used as given, no softplus (the original's fixed_gp_params)
            self.register_buffer("fixed_scale", initial)
        else:  # the original's raw parameter, initialised to `scale`: s = softplus(20) = 20.000000002
            self.register_parameter("raw_scale", torch.nn.Parameter(initial.to(torch.get_default_dtype())))

    @property
    def scale(self) -> torch.Tensor:
        """The effective scale ``s`` (shape ``batch_shape x 1 x 1``)."""
        if self.fixed:
            return self.fixed_scale
        return torch.nn.functional.softplus(self.raw_scale).clamp(SCALE_MIN, SCALE_MAX)

    def profile(self, scaled_sq_dist: torch.Tensor) -> torch.Tensor:
        """Kernel value as a function of ``d^2 / s``."""
        raise NotImplementedError

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, diag: bool = False, **params) -> torch.Tensor:
        sq_dist = self.covar_dist(x1, x2, square_dist=True, diag=diag, **params)
        scale = self.scale.to(sq_dist.dtype)
        return self.profile(sq_dist / (scale[..., 0] if diag else scale))


class CauchyKernel(_SquaredDistanceKernel):
    r"""Cauchy kernel :math:`1 / (1 + \|x - y\|^2 / s)` (the kernel the original spaVAE uses)."""

    def profile(self, scaled_sq_dist: torch.Tensor) -> torch.Tensor:
        return 1.0 / (1.0 + scaled_sq_dist)


class EQKernel(_SquaredDistanceKernel):
    r"""Exponentiated-quadratic kernel :math:`\exp(-\|x - y\|^2 / s)` (note: no factor 1/2)."""

    def profile(self, scaled_sq_dist: torch.Tensor) -> torch.Tensor:
        return torch.exp(-scaled_sq_dist)


KERNELS = {"cauchy": CauchyKernel, "eq": EQKernel, "rbf": EQKernel}


def make_kernel(kernel: str | Kernel = "cauchy", *, scale: float = 20.0, fixed: bool = False) -> Kernel:
    """A kernel by name (``'cauchy'``, ``'eq'``/``'rbf'``), or any GPyTorch kernel passed through as is."""
    if isinstance(kernel, Kernel):
        return kernel
    if not isinstance(kernel, str) or kernel.lower() not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {sorted(KERNELS)} or pass a gpytorch Kernel")
    return KERNELS[kernel.lower()](scale, fixed=fixed)

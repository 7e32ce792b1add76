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

import copy

import torch
from gpytorch.kernels import Kernel, MaternKernel

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


class SectionKernel(Kernel):
    r"""Spatial kernel times a same-section indicator, for several sections in one model (spaVAE_Batch, ALGORITHM 2.3).

    Inputs are ``[x, y, e_1..e_B]`` with ``e`` the one-hot section. The covariance is
    :math:`k(x, x') = \sum_b e_b e'_b \, k_b(\mathrm{pos}, \mathrm{pos}')`: zero across sections, and within
    section ``b`` the spatial kernel ``k_b``. With ``per_section=True`` every section has its own copy of the
    spatial kernel (the original's per-batch kernel scale); otherwise one kernel is shared.

    Parameters
    ----------
    spatial
        A kernel on the two location columns (e.g. :class:`CauchyKernel`).
    n_sections
        Number of sections ``B``.
    per_section
        Give each section its own copy of ``spatial`` (own hyperparameters).
    """

    def __init__(self, spatial: Kernel, n_sections: int, *, per_section: bool = True, **kwargs):
        super().__init__(**kwargs)
        if n_sections < 1:
            raise ValueError(f"n_sections must be >= 1, got {n_sections}")
        self.n_sections = n_sections
        self.spatials = torch.nn.ModuleList(
            [copy.deepcopy(spatial) for _ in range(n_sections)] if per_section else [spatial])

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, diag: bool = False, **params) -> torch.Tensor:
        pos1, pos2, sec1, sec2 = x1[..., :2], x2[..., :2], x1[..., 2:], x2[..., 2:]
        if sec1.shape[-1] != self.n_sections:
            raise ValueError(f"inputs must be [x, y, one-hot of {self.n_sections} sections], got width {x1.shape[-1]}")
        total = 0.0
        for b in range(self.n_sections):
            kernel = self.spatials[b % len(self.spatials)]
            spatial = kernel.forward(pos1, pos2, diag=diag, **params)
            same = sec1[..., b] * sec2[..., b] if diag else sec1[..., b].unsqueeze(-1) * sec2[..., b].unsqueeze(-2)
            total = total + same * spatial
        return total

    @property
    def scale(self) -> torch.Tensor | None:
        """Scales of the spatial kernels, one per section (``None`` if they have none)."""
        scales = [getattr(k, "scale", None) for k in self.spatials]
        return None if any(s is None for s in scales) else torch.stack([s.reshape(-1) for s in scales]).reshape(-1)


def _matern(nu: float):
    def build(scale: float, fixed: bool = False, batch_shape: torch.Size = torch.Size([])) -> Kernel:
        kernel = MaternKernel(nu=nu, batch_shape=batch_shape)
        kernel.lengthscale = scale
        if fixed:
            kernel.raw_lengthscale.requires_grad_(False)
        return kernel
    return build


KERNELS = {"cauchy": CauchyKernel, "eq": EQKernel, "rbf": EQKernel, "matern12": _matern(0.5),
           "matern32": _matern(1.5), "matern52": _matern(2.5)}


def make_kernel(kernel: str | Kernel = "cauchy", *, scale: float = 20.0, fixed: bool = False,
                batch_shape: torch.Size = torch.Size([])) -> Kernel:
    """A kernel by name, or any GPyTorch kernel passed through as is.

    Names: ``'cauchy'``, ``'eq'``/``'rbf'`` (scale ``s`` as in the original), and ``'matern12'``, ``'matern32'``,
    ``'matern52'`` (GPyTorch's ``MaternKernel`` with lengthscale ``scale``). ``batch_shape = [L]`` gives one set of
    hyperparameters per GP dimension.
    """
    if isinstance(kernel, Kernel):
        return kernel
    if not isinstance(kernel, str) or kernel.lower() not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {sorted(KERNELS)} or pass a gpytorch Kernel")
    return KERNELS[kernel.lower()](scale, fixed=fixed, batch_shape=batch_shape)

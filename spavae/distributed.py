r"""Data-parallel training of one model across processes with ``torch.distributed``.

Every process (rank) holds the whole model and the same spots; all ranks draw the same global mini-batch (the same
seeded permutation) and rank :math:`r` encodes and decodes its own contiguous share of it
(:meth:`ProcessGroup.shard`). What couples the spots of a batch is made global, so that :math:`W` ranks with
:math:`b/W` spots each compute exactly the loss and gradients of one process with the whole batch of :math:`b`:

* a batch of fewer spots than ranks (the last chunk of a pass) is not split: every rank computes all of it on its own
  (:meth:`Communicator.local`), the same result everywhere, and only rank 0's loss and gradients count;
* the GP posterior :math:`q(u)` is conditioned on the encoder outputs and locations of the **whole** batch:
  :meth:`ProcessGroup.gather_rows` gathers them with an autograd-aware all-gather (its backward sums the gradient
  of every rank's loss and hands each rank the rows of its spots); every rank then computes the same GP terms and
  keeps the marginals of its own spots and :math:`1/W` of the batch sums (:meth:`spavae.gp.GPBatchTerms.share`);
* batch normalisation uses the mean and variance of the whole batch (:class:`GlobalBatchNorm1d`);
* each rank's loss is its spots' reconstruction and Gaussian KL plus :math:`\beta\,\mathrm{KL}_{GP}/W`, so the sum
  over ranks is the single-process loss, and the gradients are **summed** over ranks
  (:meth:`ProcessGroup.sum_gradients`) before the optimiser step, which is then identical on every rank;
* the KL fed to the PI controller, the finiteness checks, the epoch's training and validation losses (and with them
  early stopping and the learning-rate schedule) are sums over ranks, so every rank takes the same decisions.

:class:`Communicator` is the single-process identity that :class:`~spavae.train.Trainer` and
:class:`~spavae.model.SpaVAEModule` use by default; :func:`current_communicator` returns a :class:`ProcessGroup`
when ``torch.distributed`` is initialised. :func:`session` joins the process group of a ``torchrun`` launch
(``gloo`` on CPU, ``nccl`` on GPUs) and :func:`launch` starts one (``spavae train --devices N``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spavae.utils import resolve_device


class Communicator:
    """One process: every operation is the identity (the default of the trainer and the module)."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0

    def attach(self, module: nn.Module) -> None:
        """Prepare ``module`` for training across the ranks (nothing to do in one process)."""

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's share of the positions of a global mini-batch (all of them in one process)."""
        return index

    @contextlib.contextmanager
    def local(self, module: nn.Module) -> Iterator[None]:
        """Within the context, ``module`` computes as in one process: its GP sees this rank's rows only and its batch
        norms (:class:`GlobalBatchNorm1d`) normalise with them; no collective runs (in one process, nothing changes).
        """
        norms = [child for child in module.modules() if isinstance(child, GlobalBatchNorm1d)]
        communicator = getattr(module, "communicator", None)
        for norm in norms:
            norm.local = True
        if communicator is not None:
            module.communicator = Communicator()
        try:
            yield
        finally:
            for norm in norms:
                norm.local = False
            if communicator is not None:
                module.communicator = communicator

    def gather_rows(self, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], slice]:
        """The rows of every rank of each ``b_r x k`` tensor, and where this rank's rows lie in them."""
        return list(tensors), slice(None)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the ranks (no gradient)."""
        return tensor

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """Sum of each number over the ranks."""
        return values

    def sum_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace each gradient by its sum over the ranks."""

    def gather_objects(self, value: Any) -> list:
        """``value`` of every rank, in rank order (picklable objects)."""
        return [value]

    def on_main(self, function: Callable, *args, **kwargs) -> Any:
        """Run ``function`` on rank 0 only and return its result on every rank (its exception is raised on all)."""
        return function(*args, **kwargs)

    def split_random_streams(self) -> None:
        """Give each rank its own global torch random stream (one process: keep it)."""


class ProcessGroup(Communicator):
    """The ranks of the default ``torch.distributed`` process group (initialised by the caller or :func:`session`).

    Collectives run on the CPU with ``gloo`` and on the rank's current CUDA device with ``nccl``.
    """

    def __init__(self):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group "
                               "first (or launch with torchrun / spavae train --devices N)")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def attach(self, module: nn.Module) -> None:
        """Use global-batch statistics in every ``BatchNorm1d`` (:class:`GlobalBatchNorm1d`), let the module's GP see
        the whole batch (``module.communicator``), copy rank 0's weights and buffers to every rank and give each rank
        its own random stream for the latent draws and dropout."""
        _global_batchnorm(module)
        if hasattr(module, "communicator"):
            module.communicator = self
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(tensor.data, src=0)
        self.split_random_streams()

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """Rank ``r``'s contiguous share of ``index`` (``torch.tensor_split`` into ``world_size`` parts; empty for some
        ranks when ``index`` has fewer positions than ranks: compute such a batch whole, within :meth:`local`)."""
        return torch.tensor_split(index, self.world_size)[self.rank]

    def gather_rows(self, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], slice]:
        """All-gather the rows of ``b_r x k`` tensors (one dtype; any ``b_r``) in rank order, with gradients.

        The backward pass sums the gradient of every rank's loss with respect to the gathered rows and returns this
        rank's rows, so the sum over ranks of the local losses is differentiated exactly.
        """
        widths = [t.shape[1] for t in tensors]
        packed = torch.cat(tensors, dim=1)
        sizes = [int(n) for n in self._all_gather(torch.tensor([packed.shape[0]], device=packed.device))]
        start = sum(sizes[:self.rank])
        rows = slice(start, start + sizes[self.rank])
        gathered = _GatherRows.apply(packed, sizes, rows)
        return list(gathered.split(widths, dim=1)), rows

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the ranks (no gradient)."""
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """Sum of each number over the ranks (in float64; every rank must pass the same keys in the same order)."""
        if not values:
            return values
        totals = self.sum(torch.tensor(list(values.values()), dtype=torch.float64, device=self.device))
        return dict(zip(values, totals.tolist()))

    def sum_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Sum the gradients over the ranks, one all-reduce per dtype.

        A parameter keeps ``grad=None`` only if it has no gradient on any rank (so the optimiser skips it exactly
        as it would in one process).
        """
        groups: dict[torch.dtype, list[nn.Parameter]] = {}
        for parameter in parameters:
            if parameter.requires_grad:
                groups.setdefault(parameter.dtype, []).append(parameter)
        for group in groups.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
                             + [group[0].new_tensor([float(p.grad is not None) for p in group])])
            dist.all_reduce(flat)
            values, has_grad = flat[:-len(group)], flat[-len(group):]
            for parameter, grad, present in zip(group, values.split([p.numel() for p in group]), has_grad.tolist()):
                parameter.grad = grad.view_as(parameter).clone() if present else None

    def gather_objects(self, value: Any) -> list:
        """``value`` of every rank, in rank order."""
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def on_main(self, function: Callable, *args, **kwargs) -> Any:
        """Run ``function`` on rank 0 only and broadcast its result, or its exception, to every rank."""
        outcome: list = [None]
        if self.is_main:
            try:
                outcome[0] = (function(*args, **kwargs), None)
            except Exception as err:  # noqa: BLE001 (raised on every rank below, so that no rank waits)
                outcome[0] = (None, err)
        dist.broadcast_object_list(outcome, src=0)
        result, error = outcome[0]
        if error is not None:
            raise error
        return result

    def split_random_streams(self) -> None:
        """Rank 0 keeps the global torch random stream; rank ``r > 0`` reseeds it with a draw from it plus ``r``.

        All ranks start from the same stream, so the result is deterministic, and the ranks' latent draws and
        dropout masks are independent, as the draws of different spots are in one process.
        """
        if self.rank:
            torch.manual_seed(int(torch.randint(2 ** 62, ())) + self.rank)


class _GatherRows(torch.autograd.Function):
    """All-gather of rows with uneven sizes; backward: sum of the gradients over the ranks, this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int], rows: slice) -> torch.Tensor:
        ctx.rows = rows
        padded = tensor.new_zeros(max(sizes), tensor.shape[1])
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.rows], None, None


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with gradients: every rank's loss depends on the sum, so the backward sums too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` that normalises with the mean and variance of the rows of **every** rank in training.

    ``torch.nn.SyncBatchNorm`` does the same on GPUs only; this one works with any backend (two all-reduces per
    forward pass: the sums, then the sums of squared deviations from the global mean). The running statistics are
    updated with the global mean and unbiased variance, as a ``BatchNorm1d`` of one process sees them, and evaluation
    is that of ``BatchNorm1d``, as is training with ``local`` set (:meth:`Communicator.local`). The parameters and
    buffers are those of the converted layer (same names), so state dicts and optimisers are unaffected.
    """

    #: Normalise with this rank's rows only, as ``BatchNorm1d`` (set by :meth:`Communicator.local`).
    local = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.local:
            return super().forward(input)
        sums = _SumOverRanks.apply(torch.cat([input.sum(0), input.new_tensor([input.shape[0]])]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = input - mean
        var = _SumOverRanks.apply(centred.square().sum(0)) / count
        out = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(var * count / (count - 1), alpha=factor)
        return out


def _global_batchnorm(module: nn.Module) -> None:
    """Replace every ``BatchNorm1d`` below ``module`` by a :class:`GlobalBatchNorm1d` with the same tensors."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            replacement = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats)
            if child.affine:
                replacement.weight, replacement.bias = child.weight, child.bias
            for buffer, tensor in child.named_buffers(recurse=False):
                setattr(replacement, buffer, tensor)
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            _global_batchnorm(child)


def current_communicator() -> Communicator:
    """A :class:`ProcessGroup` when ``torch.distributed`` is initialised, else the single-process :class:`Communicator`."""
    return ProcessGroup() if dist.is_available() and dist.is_initialized() else Communicator()


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def session(device: str | torch.device = "auto") -> Iterator[Communicator]:
    """The communicator of this process for the duration of a training run.

    In a process started by ``torchrun`` with several ranks, joins the process group (``nccl`` when ``device``
    resolves to CUDA, each rank on GPU ``LOCAL_RANK``; ``gloo`` otherwise) and leaves it at the end. A process group
    initialised by the caller is used as it is (and left open); otherwise this is a single process.
    """
    if dist.is_initialized() or not launched():
        yield current_communicator()
        return
    backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield ProcessGroup()
    finally:
        dist.destroy_process_group()


def launch_command(n_processes: int, argv: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m spavae.cli ARGV`` (one machine)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_processes}",
            "-m", "spavae.cli", *argv]


def launch(n_processes: int, argv: Sequence[str]) -> int:
    """Run the command line ``argv`` of ``spavae`` in ``n_processes`` ranks on this machine; returns the exit code.

    The ranks see ``torchrun``'s environment (:func:`launched`), so they do not launch again.
    """
    return subprocess.run(launch_command(n_processes, argv), check=False).returncode

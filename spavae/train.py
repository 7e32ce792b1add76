"""The training loop: AdamW, train/validation split, PI-controlled beta, early stopping, history (ALGORITHM 6)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from linear_operator.utils.errors import NotPSDError
from tqdm.auto import tqdm

from spavae.beta import PIController
from spavae.distributed import Communicator, current_communicator
from spavae.model import LossOutput, SpaVAEModule
from spavae.utils import check_number

if TYPE_CHECKING:
    from spavae.data.spots import SpotData

logger = logging.getLogger("spavae")


#: An epoch is at most this many steps: on sections larger than ``MAX_STEPS_PER_EPOCH * batch_size`` training
#: spots, each epoch is a fresh random sample of that many spots, so validation, early stopping, the scheduler,
#: checkpoints and the history keep the rhythm they have on a Visium section (4,000 spots: 8 steps per epoch).
MAX_STEPS_PER_EPOCH = 100
#: An epoch is at least this many steps: on sections too small for that many batches (below about 900 training
#: spots at batch 128), more freshly shuffled passes are drawn until it has them. Patience, ``max_epochs`` and the
#: PI controller were set on sections with 7-8 steps per epoch (a Visium section at batch 512, the 1,024-spot
#: simulator at batch 128); a 200-spot section has one batch per pass, so it stopped early after a few dozen steps.
MIN_STEPS_PER_EPOCH = 7
#: At most this many spots are held out for validation: the validation loss of 4,096 spots is precise to well
#: under the improvements early stopping looks for, and checking it costs at most 8 batches.
MAX_VALIDATION = 4096
#: The default step budget (``max_steps='auto'``): 5,000 steps is 1.8 times a whole 400-epoch run on a Visium
#: DLPFC section (2,800 steps, where the domains have long settled), and about 8 minutes at batch 512 and 2,000
#: genes on 2 CPU cores. 400 epochs of a section of up to about 6,500 spots stay under it, so only large
#: sections are capped.
AUTO_MAX_STEPS = 5_000


def auto_batch_size(n_spots: int) -> int:
    """The original's rule: 128 up to 1024 spots, 256 up to 2048, else 512."""
    return 128 if n_spots <= 1024 else 256 if n_spots <= 2048 else 512


def split_indices(n: int, train_size: float, generator: torch.Generator,
                  max_validation: int = MAX_VALIDATION) -> tuple[torch.Tensor, torch.Tensor]:
    """Random train/validation split: ``n - floor(n * train_size)`` validation spots, at most ``max_validation``.

    A validation set of a single spot gives no usable early-stopping signal, so then every spot trains (and a
    message says so) rather than one spot being used for neither.
    """
    if not 0 < train_size <= 1:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}")
    order = torch.randperm(n, generator=generator)
    n_val = 0 if train_size == 1 else min(n - min(max(int(math.floor(n * train_size)), 1), n - 1), max_validation)
    if n_val == 1:
        logger.info("train_size %.3g of %d spots leaves one validation spot; training on all spots without "
                    "early stopping", train_size, n)
        n_val = 0
    return order[:n - n_val], order[n - n_val:]


@dataclass
class TrainingState:
    """What the loop keeps between epochs (enough to resume)."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    epochs_without_improvement: int = 0
    step: int = 0
    stop_reason: str | None = None
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Train a :class:`~spavae.model.SpaVAEModule` with the original's loop and its fixes.

    Parameters
    ----------
    module
        The module to train (in place).
    data
        All spots (:class:`~spavae.data.spots.SpotData`): mini-batches are made from it on the fly.
    lr, weight_decay
        AdamW settings (applied to every parameter, as in the original).
    batch_size
        Mini-batch size, or ``'auto'``.
    train_size
        Fraction of spots used for training; the rest is the validation set for early stopping.
        With 1.0 there is no validation and training runs ``max_epochs``.
    patience
        Epochs without a better validation loss before stopping. Whatever ends training (early stopping,
        ``max_epochs``, ``max_steps``, a numerical failure), the best validation weights are restored.
    beta
        A :class:`~spavae.beta.PIController`, or a number for a fixed beta.
    num_samples
        Latent samples per spot for the NB term.
    noise
        Denoising-noise regulariser (0 = off).
    generator
        Random generator for the split and the shuffling.
    lr_scheduler
        ``None`` (constant learning rate, the original) or keyword arguments of
        :class:`torch.optim.lr_scheduler.ReduceLROnPlateau` (``factor``, ``patience``, ``min_lr``, ...). It is
        stepped once per epoch on the monitored loss: the validation loss, or the training loss without validation.
    callbacks
        Functions ``callback(trainer, record)`` called at the end of every completed epoch with that epoch's
        history record, after the best weights and ``state.stop_reason`` are updated and before an early stop
        restores the best weights (e.g. to write checkpoints or logs).
    max_steps
        Budget of optimisation steps (``'auto'``: :data:`AUTO_MAX_STEPS`; ``None``: no budget).
    communicator
        Data-parallel training across processes (:mod:`spavae.distributed`); default: :func:`current_communicator`
        (every process of an initialised ``torch.distributed`` group, else this process alone). Every rank then draws
        the same global mini-batches and trains on its share of them; the module is attached to the communicator
        (global batch norm and GP conditioning); gradients, the KL of the beta controller, the losses of the history
        and early stopping are global, and only rank 0 shows a progress bar. ``batch_size`` is the global batch.
    """

    def __init__(self, module: SpaVAEModule, data: SpotData, *, lr: float = 1e-3, weight_decay: float = 1e-6,
                 batch_size: int | str = "auto", train_size: float = 0.95, patience: int = 200,
                 beta: PIController | float = 10.0, num_samples: int = 1, noise: float = 0.0,
                 generator: torch.Generator | None = None, lr_scheduler: dict | None = None,
                 callbacks: Sequence[Callable[[Trainer, dict], None]] = (), max_steps: int | str | None = "auto",
                 communicator: Communicator | None = None):
        if batch_size == "auto":
            batch_size = auto_batch_size(len(data))
        if not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"batch_size must be an integer >= 2 or 'auto', got {batch_size!r}")
        check_number("patience", patience, integer=True, low=1)
        check_number("num_samples", num_samples, integer=True, low=1)
        check_number("lr", lr, low=0, inclusive=False)
        check_number("weight_decay", weight_decay, low=0)
        check_number("noise", noise, low=0)
        if max_steps == "auto":
            max_steps = AUTO_MAX_STEPS
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer, 'auto' or None, got {max_steps!r}")
        self.module, self.data, self.max_steps = module, data, max_steps
        self.batch_size, self.patience = batch_size, patience
        self.beta = beta
        self.num_samples, self.noise = num_samples, noise
        self.generator = generator or torch.Generator().manual_seed(0)
        self.train_index, self.val_index = split_indices(len(data), train_size, self.generator)
        self.drop_last = len(self.train_index) > batch_size
        self.communicator = communicator or current_communicator()
        self.communicator.attach(module)
        # fused: one kernel updates every parameter (the same update as the per-tensor loop, in a quarter of the time)
        self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr,
                                           weight_decay=weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau
        try:
            self.scheduler = None if lr_scheduler is None else scheduler(self.optimizer, mode="min", **lr_scheduler)
        except TypeError as err:  # an unknown option, or not a dict
            raise ValueError(f"lr_scheduler must be None or a dict of ReduceLROnPlateau options (factor, patience, "
                             f"min_lr, ...): {err}") from None
        self.callbacks = list(callbacks)
        self.state = TrainingState()

    @property
    def has_validation(self) -> bool:
        """Whether early stopping watches a validation set (at least two held-out spots)."""
        return len(self.val_index) > 1

    @property
    def current_beta(self) -> float:
        """The KL weight used for the next step."""
        return self.beta.beta if isinstance(self.beta, PIController) else float(self.beta)

    def _batches(self, index: torch.Tensor, shuffle: bool, drop_last: bool, max_steps: int | None = None):
        if shuffle:
            index = index[torch.randperm(len(index), generator=self.generator)]
        stop = len(index) - len(index) % self.batch_size if drop_last else len(index)
        if max_steps is not None:
            stop = min(stop, max_steps * self.batch_size)
        for start in range(0, stop, self.batch_size):
            chunk = index[start:start + self.batch_size]
            if len(chunk) >= 2:  # BatchNorm needs two spots
                yield chunk

    def _epoch_batches(self, steps: int):
        """The training batches of one epoch: a shuffled pass over the training spots, then further passes (each
        reshuffled) while the epoch has fewer than :data:`MIN_STEPS_PER_EPOCH` steps; at most ``steps`` in all."""
        done = 0
        while done < min(steps, MIN_STEPS_PER_EPOCH) or done == 0:
            limit = steps - done if done == 0 else min(steps, MIN_STEPS_PER_EPOCH) - done
            before = done
            for index in self._batches(self.train_index, True, self.drop_last, limit):
                done += 1
                yield index
            if done == before:  # no batch at all (fewer than two training spots)
                return

    def _train_epoch(self) -> dict | None:
        self.module.train()
        sums: dict[str, float] = {}
        steps = MAX_STEPS_PER_EPOCH
        if self.max_steps is not None:
            steps = min(steps, self.max_steps - self.state.step)
        for index in self._epoch_batches(steps):
            out, counted = self._share_loss(index)
            totals = torch.stack([out.loss.detach(), (out.kl_gp + out.kl_gauss).detach(),
                                  out.loss.new_tensor(out.n_spots)])
            loss, kl, n_spots = self.communicator.sum(totals if counted else torch.zeros_like(totals))
            if not torch.isfinite(loss):
                return None
            self.optimizer.zero_grad(set_to_none=True)
            if counted:
                out.loss.backward()
            self.communicator.sum_gradients(self.module.parameters())
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), math.inf)
            if not torch.isfinite(grad_norm):
                return None
            self.optimizer.step()
            self.state.step += 1
            if isinstance(self.beta, PIController):
                self.beta.step(float(kl) / float(n_spots))
            _accumulate(sums, out, counted)
        return _per_spot(self.communicator.sum_values(sums))

    @torch.no_grad()
    def _validate(self) -> dict:
        self.module.eval()
        sums: dict[str, float] = {}
        for index in self._batches(self.val_index, False, False):
            _accumulate(sums, *self._share_loss(index))
        return _per_spot(self.communicator.sum_values(sums))

    def _share_loss(self, index: torch.Tensor) -> tuple[LossOutput, bool]:
        """This process's part of the loss of the global batch ``index``, and whether it counts in the sums.

        A batch is split over the processes (:meth:`~spavae.distributed.Communicator.shard`), except one with fewer
        spots than processes: each process then computes all of it on its own
        (:meth:`~spavae.distributed.Communicator.local`; the same batch-norm statistics everywhere, so the running
        statistics stay equal) and only rank 0's loss and gradients count, as that batch's in one process.
        """
        communicator = self.communicator
        whole = len(index) < communicator.world_size
        batch = self.data.batch(index if whole else communicator.shard(index))
        with communicator.local(self.module) if whole else contextlib.nullcontext():
            out = self.module.loss(batch, self.current_beta, num_samples=self.num_samples, noise=self.noise)
        return out, communicator.is_main or not whole

    @property
    def budget_spent(self) -> bool:
        """Whether the step budget is used up."""
        return self.max_steps is not None and self.state.step >= self.max_steps

    def finished(self, max_epochs: int) -> bool:
        """Whether training is over: stopped, at ``max_epochs`` epochs or at the step budget."""
        return self.state.stop_reason is not None or self.state.epoch >= max_epochs or self.budget_spent

    def restore_best(self) -> None:
        """Load the best validation weights, if any (called whatever ended training, resumed runs included)."""
        if self.state.best_state is not None:
            self.module.load_state_dict(self.state.best_state)
            logger.info("restored the best weights of epoch %d", self.state.best_epoch)

    def _run_epoch(self) -> tuple[dict | None, dict | None]:
        """One epoch of training and the validation loss after it; ``None`` parts on a non-finite loss."""
        train = self._train_epoch()
        if train is None or not all(math.isfinite(v) for v in train.values()):
            return None, None
        val = self._validate() if self.has_validation else None
        if val is not None and not math.isfinite(val["loss"]):
            return train, None
        return train, val

    def fit(self, max_epochs: int, *, progress: bool = True) -> list[dict]:
        """Run up to ``max_epochs`` more epochs (or until the step budget); returns the per-epoch history.

        A non-finite loss or a failed Cholesky factorisation never reaches the weights: training stops, the best
        (or, without validation, the last good) weights are restored and a warning explains what happened and
        what to try. Only finite epochs enter the history.
        """
        check_number("max_epochs", max_epochs, integer=True, low=1)
        state = self.state
        has_validation = self.has_validation
        bar = tqdm(range(max_epochs), desc="spavae", disable=not progress or not self.communicator.is_main,
                   unit="epoch", leave=False)
        for _ in bar:
            if state.stop_reason is not None or self.budget_spent:
                break
            start = time.perf_counter()
            last_good = None if has_validation else copy.deepcopy(self.module.state_dict())
            try:
                train, val = self._run_epoch()
            except (torch.linalg.LinAlgError, NotPSDError) as err:
                self._stop_numerical(last_good, "the GP's Cholesky factorisation failed (a kernel matrix was not "
                                     f"positive definite: {str(err).splitlines()[0][:80]})")
                break
            if train is None or (has_validation and val is None):
                self._stop_numerical(last_good, "the " + ("training" if train is None else "validation")
                                     + " loss became NaN/inf")
                break
            state.epoch += 1
            record = {"epoch": state.epoch, "step": state.step, **{f"train_{k}": v for k, v in train.items()}}
            monitored = train["loss"]
            if val is not None:
                record |= {f"val_{k}": v for k, v in val.items()}
                monitored = val["loss"]
            record |= {"beta": self.current_beta, "kernel_scale": self.module.gp.kernel_scale,
                       "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
            state.history.append(record)
            bar.set_postfix(loss=f"{train['loss']:.2f}", val=f"{monitored:.2f}", beta=f"{self.current_beta:.2f}")
            if has_validation:
                if monitored <= state.best_loss:
                    state.best_loss, state.best_epoch = monitored, state.epoch
                    state.best_state = copy.deepcopy(self.module.state_dict())
                    state.epochs_without_improvement = 0
                else:
                    state.epochs_without_improvement += 1
                    if state.epochs_without_improvement >= self.patience:
                        state.stop_reason = f"early stopping at epoch {state.epoch}"
            if self.budget_spent and state.stop_reason is None:
                state.stop_reason = f"step budget of {self.max_steps} steps reached at epoch {state.epoch}"
            if self.scheduler is not None:
                self.scheduler.step(monitored)
            for callback in self.callbacks:
                callback(self, record)
            if state.stop_reason is not None:
                logger.info("%s", state.stop_reason)
                break
        bar.close()
        self.restore_best()
        return state.history

    def state_dict(self) -> dict:
        """Everything needed to continue training exactly: weights, optimiser, scheduler, beta, RNGs and state.

        The tensors are those of the live objects: serialise (``torch.save``) or deep-copy the result before
        training on. In data-parallel training every rank must call it (it gathers the random states of all ranks,
        kept under ``rng['ranks']``; the other entries are the same on every rank).
        """
        ranks = self.communicator.gather_objects(
            {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "numpy": np.random.get_state(), "python": random.getstate()})
        rng = {"generator": self.generator.get_state(), **ranks[0]} | ({"ranks": ranks} if len(ranks) > 1 else {})
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "beta": self.beta.state_dict() if isinstance(self.beta, PIController) else float(self.beta),
            "split": {"train": self.train_index.clone(), "validation": self.val_index.clone()},
            "rng": rng,
            "state": dataclasses.asdict(self.state),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` into this trainer (built with the same module layout and settings).

        The global torch, NumPy and Python random states are restored too, so that the next epochs draw exactly
        the numbers an uninterrupted run would have drawn. Each rank of a data-parallel run restores its own; when the
        saved run had another number of ranks, every rank restores rank 0's and :meth:`Communicator.split_random_streams
        <spavae.distributed.Communicator.split_random_streams>` splits them (training goes on, but the latent draws
        differ from those of an uninterrupted run).
        """
        split = state["split"]
        if len(split["train"]) != len(self.train_index) or len(split["validation"]) != len(self.val_index):
            raise ValueError(
                f"the saved trainer split {len(split['train'])}/{len(split['validation'])} spots (train/validation) "
                f"but this trainer has {len(self.train_index)}/{len(self.val_index)}: the data or train_size differ"
            )
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise ValueError("the saved trainer and this one differ in having a learning-rate scheduler")
        if isinstance(state["beta"], dict) != isinstance(self.beta, PIController):
            raise ValueError("the saved trainer and this one differ in using a dynamic (PI-controlled) beta")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if isinstance(self.beta, PIController):
            self.beta.load_state_dict(state["beta"])
        else:
            self.beta = state["beta"]
        self.train_index, self.val_index = split["train"].clone(), split["validation"].clone()
        self.generator.set_state(state["rng"]["generator"])
        ranks = state["rng"].get("ranks", [state["rng"]])
        same_ranks = len(ranks) == self.communicator.world_size
        rng = ranks[self.communicator.rank] if same_ranks else ranks[0]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if not same_ranks:
            logger.info("the checkpoint was written by %d process(es), this run has %d: the latent draws will differ "
                        "from those of an uninterrupted run", len(ranks), self.communicator.world_size)
            self.communicator.split_random_streams()
        self.state = TrainingState(**copy.deepcopy(state["state"]))

    def _stop_numerical(self, last_good: dict | None, what: str) -> None:
        state = self.state
        restore = state.best_state if state.best_state is not None else last_good
        where = f"epoch {state.best_epoch}" if state.best_state is not None else f"the end of epoch {state.epoch}"
        state.stop_reason = f"{what} in epoch {state.epoch + 1}"
        advice = ("Try a lower learning rate (lr=), float64 networks (dtype='float64'), a larger kernel scale "
                  "(kernel_scale=), fewer inducing points (inducing_steps=, n_inducing=), or check the input counts.")
        if restore is None:
            raise FloatingPointError(f"training failed before any weights could be kept: {state.stop_reason}. {advice}")
        self.module.load_state_dict(restore)
        warnings.warn(f"training stopped: {state.stop_reason}; kept the weights of {where}. {advice}",
                      RuntimeWarning, stacklevel=3)


def _accumulate(sums: dict[str, float], out: LossOutput, counted: bool = True) -> None:
    """Add the parts of ``out`` to ``sums`` (zeros when it does not count: every process keeps the same keys)."""
    for key, value in out.detached().items():
        sums[key] = sums.get(key, 0.0) + (value if counted else 0.0)


def _per_spot(sums: dict[str, float]) -> dict:
    n = sums.pop("n_spots", 0)
    return {k: v / max(n, 1) for k, v in sums.items()}

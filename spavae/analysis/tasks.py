"""Independent tasks (a function called with several sets of arguments) as Ray tasks or one after the other.

:func:`run_tasks` is the executor underneath the permutation null of spatially variable genes
(:func:`spavae.analysis.svg.permutation_null`) and the sweeps (:func:`spavae.sweep.run_sweep`). A task that raises
is a :class:`TaskResult` with its error, and the other tasks go on; each task trains with ``threads_per_task``
torch threads and reserves that many Ray CPUs, so Ray never runs more training threads than the cores it was given.
Ray is optional (``pip install spavae[distributed]``).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

INSTALL_HINT = "Ray is not installed: pip install spavae[distributed]"


def import_ray():
    """The ``ray`` module, or an :class:`ImportError` with the one-line install hint."""
    try:
        import ray
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray for the duration of a call: the running session if there is one, else a new one that is shut down after.

    Parameters
    ----------
    address
        ``None`` starts a local Ray; ``'auto'`` or ``'ray://host:10001'``/``'host:6379'`` connects to an existing
        cluster (whose nodes must have spavae installed).
    num_cpus
        CPUs of a local Ray (default: all cores); an existing cluster has its own.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is not None and num_cpus is not None:
        raise ValueError("num_cpus sets the size of a local Ray; an existing cluster (address) has its own CPUs")
    options = {"num_cpus": num_cpus} if address is None else {}
    ray.init(address=address, include_dashboard=False, log_to_driver=False, **options)
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass
class TaskResult:
    """Outcome of one task: its return value, or the error (``'Type: message'``) and traceback."""

    value: Any = None
    error: str | None = None
    traceback: str | None = None
    seconds: float = 0.0


def _call(fn: Callable, threads: int | None, *args) -> TaskResult:
    """Run ``fn(*args)`` with ``threads`` torch threads and catch what it raises (also the body of a Ray task)."""
    import torch

    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        return TaskResult(fn(*args), seconds=time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - a task's failure is its result
        return TaskResult(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(),
                          seconds=time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved)


def run_tasks(fn: Callable, tasks: Sequence[tuple], *, common: tuple = (), use_ray: bool = True,
              address: str | None = None, num_cpus: int | None = None, threads_per_task: int | None = 1,
              on_result: Callable[[int, TaskResult], None] | None = None) -> list[TaskResult]:
    """``fn(*common, *task)`` for every task, as Ray tasks or in series; a failing task does not stop the others.

    Parameters
    ----------
    fn
        A module-level function (Ray pickles it by reference).
    tasks
        Positional arguments of each call.
    common
        Arguments shared by every call (e.g. an AnnData); put in the Ray object store once.
    use_ray
        Run on Ray (local, or the cluster at ``address``); ``False`` runs in this process, one after the other.
    address, num_cpus
        See :func:`ray_session`.
    threads_per_task
        Ray CPUs reserved per task and torch threads used by it; at most ``num_cpus / threads_per_task`` tasks
        run at once. In series, ``None`` keeps this process's thread setting.
    on_result
        Called as ``on_result(index, result)`` as each task finishes (in completion order).

    Returns
    -------
    One :class:`TaskResult` per task, in the order of ``tasks``.
    """
    if not (threads_per_task is None and not use_ray) and (not isinstance(threads_per_task, int)
                                                          or threads_per_task < 1):
        raise ValueError(f"threads_per_task must be an integer >= 1, got {threads_per_task!r}")
    results: list[TaskResult | None] = [None] * len(tasks)

    def done(index: int, result: TaskResult) -> None:
        results[index] = result
        if on_result is not None:
            on_result(index, result)

    if not use_ray:
        for index, task in enumerate(tasks):
            done(index, _call(fn, threads_per_task, *common, *task))
        return results
    if not tasks:
        return []
    with ray_session(address, num_cpus) as ray:
        remote = ray.remote(_call).options(num_cpus=threads_per_task, max_retries=0)
        shared = [ray.put(value) for value in common]
        pending = {remote.remote(fn, threads_per_task, *shared, *task): index for index, task in enumerate(tasks)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                index = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as err:  # the worker died (out of memory, killed, node lost)
                    result = TaskResult(error=f"{type(err).__name__}: {err}", traceback=str(err))
                done(index, result)
    return results

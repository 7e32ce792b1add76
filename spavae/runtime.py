"""CPU threads that behave on a shared machine: OpenMP's wait policy and a thread-count probe.

A training step is hundreds of small operations, each an OpenMP parallel region that ends at a barrier. Under
GNU OpenMP's default (active) wait policy, a thread that reaches a barrier first spins until the others arrive.
On a quiet machine that saves a wake-up; on a machine where another process holds a core (a browser, a notebook
kernel, a second job), the thread it is waiting for is descheduled and every barrier costs a scheduler time
slice: a 1,024-spot run took 205 s instead of 15-17 s on 2 cores with one busy process beside it. With the
passive policy a waiting thread sleeps, and the run took 17 s.

OpenMP reads ``OMP_WAIT_POLICY`` once, when torch loads it. So :func:`prefer_passive_wait` runs when ``spavae``
is imported, before ``spavae`` imports torch, and sets the passive policy unless the user set a policy of their
own. If torch was imported first it is too late to change the policy; :func:`settle_threads` then times a short
workload of small operations at torch's thread count and at one thread, right before training, and keeps the
faster (this takes about a tenth of a second).
"""

from __future__ import annotations

import os
import sys
import time

WAIT_POLICY = "OMP_WAIT_POLICY"

#: How the wait policy was decided when spavae was imported: "passive" (set by spavae), "user" (set before) or
#: "active" (torch was imported before spavae and had already read the default policy).
wait_policy_source = "unset"


def prefer_passive_wait() -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for torch's OpenMP threads unless the user chose a policy or it is too late.

    Returns
    -------
    ``"user"`` if ``OMP_WAIT_POLICY`` was already set (it is left as it is), ``"active"`` if torch was imported
    before this call (its OpenMP runtime has read the default policy and cannot change it), else ``"passive"``.
    """
    global wait_policy_source
    if WAIT_POLICY in os.environ:
        wait_policy_source = "user"
    elif "torch" in sys.modules:
        wait_policy_source = "active"
    else:
        os.environ[WAIT_POLICY] = "PASSIVE"
        wait_policy_source = "passive"
    return wait_policy_source


def _small_ops_seconds(threads: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` time of 40 small parallel regions (a step's typical operation size) at ``threads``."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(512, 64)
    w = torch.randn(64, 64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            h = torch.relu(a @ w)
            h = torch.softmax(h, dim=1) * a
            h.sum()
        best = min(best, time.perf_counter() - start)
    return best


def settle_threads() -> int | None:
    """Keep torch's CPU thread count, or drop to one thread when spinning OpenMP threads lose to a busy machine.

    Does nothing (returns ``None``) unless torch was imported before spavae with the active wait policy and torch
    uses more than one thread. Then the same small workload is timed at torch's thread count and at one thread,
    alternately, and the faster count is set with ``torch.set_num_threads`` and returned.
    """
    import torch

    threads = torch.get_num_threads()
    if wait_policy_source != "active" or threads == 1:
        return None
    times = {threads: float("inf"), 1: float("inf")}
    for _ in range(2):
        for candidate in (threads, 1):
            times[candidate] = min(times[candidate], _small_ops_seconds(candidate))
    chosen = min(times, key=times.get)
    torch.set_num_threads(chosen)
    return chosen

"""OpenMP's wait policy and the thread probe (spavae.runtime): set before torch starts, never over the user's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _python(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (torch not yet loaded) and return the JSON it prints."""
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                            timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


REPORT = ("import json, os, sys, spavae.runtime as r; "
          "print(json.dumps({'policy': os.environ.get('OMP_WAIT_POLICY'), 'source': r.wait_policy_source, "
          "'torch': 'torch' in sys.modules}))")


def test_importing_spavae_sets_a_passive_wait_policy_before_torch_starts():
    seen = _python("import spavae; " + REPORT)
    assert seen == {"policy": "PASSIVE", "source": "passive", "torch": True}


def test_a_policy_the_user_set_is_kept():
    seen = _python("import spavae; " + REPORT, OMP_WAIT_POLICY="ACTIVE")
    assert seen == {"policy": "ACTIVE", "source": "user", "torch": True}


def test_torch_imported_first_keeps_its_policy_and_training_probes_the_thread_count():
    code = ("import torch; torch.set_num_threads(2); import json, spavae, spavae.runtime as r; "
            "source = r.wait_policy_source; import os; policy = os.environ.get('OMP_WAIT_POLICY'); "
            "chosen = r.settle_threads(); "
            "print(json.dumps({'source': source, 'policy': policy, 'chosen': chosen, "
            "'threads': torch.get_num_threads()}))")
    seen = _python(code)
    assert seen["source"] == "active" and seen["policy"] is None  # too late to change: left unset
    assert seen["chosen"] in (1, 2) and seen["threads"] == seen["chosen"]


def test_the_probe_does_nothing_when_the_policy_is_passive():
    seen = _python("import json, spavae, spavae.runtime as r, torch; torch.set_num_threads(2); "
                   "print(json.dumps({'chosen': r.settle_threads(), 'threads': torch.get_num_threads()}))")
    assert seen == {"chosen": None, "threads": 2}


@pytest.mark.parametrize("threads", [1, 2])
def test_the_probe_times_both_counts_and_keeps_the_faster(monkeypatch, threads):
    import torch

    import spavae.runtime as runtime

    slower = 1 if threads == 2 else 2
    monkeypatch.setattr(runtime, "wait_policy_source", "active")
    monkeypatch.setattr(runtime, "_small_ops_seconds", lambda n, repeats=3: 1.0 if n == slower else 0.5)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert runtime.settle_threads() == threads
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)

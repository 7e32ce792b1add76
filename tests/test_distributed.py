"""Data-parallel training (spavae.distributed): gloo ranks on the CPU against one process.

One spawn of two ranks (``torch.multiprocessing``, file rendezvous) runs three jobs whose outputs the tests read:
one optimisation step, an uninterrupted 4-epoch experiment, and the same experiment whose rank 1 kills itself once
the epoch-2 checkpoint is on disk. The killed run is then finished with ``spavae resume --devices 2`` (torchrun).
A spawn of three ranks trains on batches that do not split evenly, with a last chunk smaller than the ranks.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spavae
from spavae import cli, experiment
from spavae.beta import PIController
from spavae.config import config_from_dict
from spavae.train import Trainer, split_indices

BATCH, TRAIN_SIZE, SEED = 64, 0.9, 0
MODEL = {"dtype": "float64", "seed": SEED, "encoder_layers": (32, 16), "decoder_layers": (32,), "inducing_steps": 3,
         "device": "cpu"}
KILL_AFTER_EPOCH = 2
#: Three ranks, batches of 32 (11/11/10 spots per rank), 2 epochs of 7 steps on 100 spots, and two splits whose
#: last chunk has fewer spots than ranks: 66 training spots (2 batches a pass) and 34 validation spots (32, then 2);
#: 2 training spots (one batch of 2) and 98 validation spots (32, 32, 32, then 2).
UNEVEN_RANKS, UNEVEN_BATCH, UNEVEN_EPOCHS = 3, 32, 2
UNEVEN_SPLITS = {"validation": (0.665, [32, 32], [32, 2]), "training": (0.02, [2], [32, 32, 32, 2])}


def _adata():
    return spavae.simulate_spatial_counts(n_rows=12, n_cols=12, n_genes=40, n_domains=3, seed=1)


def _small_adata():
    return spavae.simulate_spatial_counts(n_rows=10, n_cols=10, n_genes=30, n_domains=3, seed=2)


def _fixed_rsample(self, sample_shape=torch.Size()):  # noqa: B008 (the signature of Normal.rsample)
    """Latent draws ``loc + scale * sin(1000 loc)``: the same noise for a spot in any process and batch split (the
    ranks' own random streams cannot reproduce one process's stream, so the step comparison fixes the draws)."""
    return self.loc + self.scale * torch.sin(1e3 * self.loc.detach())


def _config(data: Path, save_dir: Path, name: str) -> dict:
    return {"name": name, "save_dir": str(save_dir), "data": {"path": str(data)},
            "model": {"dtype": "float64", "encoder_layers": [32, 16], "decoder_layers": [32], "inducing_steps": 3},
            "optimizer": {"lr": 5e-3},
            "trainer": {"max_epochs": 4, "batch_size": BATCH, "train_size": TRAIN_SIZE, "checkpoint_every": 1,
                        "device": "cpu", "threads": 1, "progress": False}}


# ---------------------------------------------------------------------- the jobs of the two ranks
def _step_job(rank: int, out: Path) -> None:
    """One step of a Trainer (the optimiser step replaced by a capture of the summed gradients)."""
    rsample, torch.distributions.Normal.rsample = torch.distributions.Normal.rsample, _fixed_rsample
    model = spavae.SpaVAE(_adata(), **MODEL)
    controller = PIController(0.025 * model.module.n_latent)
    trainer = Trainer(model.module, model.data, batch_size=BATCH, train_size=TRAIN_SIZE, beta=controller,
                      generator=torch.Generator().manual_seed(SEED), max_steps=1)
    grads: dict = {}
    trainer.optimizer.step = lambda: grads.update(
        {name: p.grad.clone() for name, p in model.module.named_parameters() if p.grad is not None})
    trainer.fit(1, progress=False)
    torch.distributions.Normal.rsample = rsample
    torch.save({"grads": grads, "record": trainer.state.history[0], "beta": trainer.current_beta},
               out / f"step{rank}.pt")


def _trained_models() -> list:
    """Keep every SpaVAE that experiment.train trains (to read each rank's final state)."""
    kept, train = [], spavae.SpaVAE.train

    def keep(self, **kwargs):
        kept.append(self)
        return train(self, **kwargs)

    spavae.SpaVAE.train = keep
    return kept


def _full_job(rank: int, out: Path) -> None:
    kept = _trained_models()
    experiment.train(config_from_dict(_config(out / "data.h5ad", out, "full")), evaluate_after=False)
    model = kept[-1]
    torch.save({"module": model.module.state_dict(), "beta": model.trainer.current_beta,
                "history": model.trainer.state.history}, out / f"full{rank}.pt")


def _killed_job(rank: int, out: Path) -> None:
    if rank == 1:
        checkpoint = experiment.Recorder.checkpoint

        def checkpoint_then_die(self, trainer):
            checkpoint(self, trainer)
            written = self.run.checkpoint_file(KILL_AFTER_EPOCH)
            if trainer.state.epoch == KILL_AFTER_EPOCH:
                for _ in range(600):  # rank 0 writes it after this collective
                    if written.exists():
                        break
                    time.sleep(0.05)
                os._exit(1)

        experiment.Recorder.checkpoint = checkpoint_then_die
    experiment.train(config_from_dict(_config(out / "data.h5ad", out, "killed")), evaluate_after=False)


def _uneven_trainer(train_size: float) -> Trainer:
    """A trainer of the uneven settings (the same in every rank and in one process)."""
    model = spavae.SpaVAE(_small_adata(), **MODEL)
    return Trainer(model.module, model.data, batch_size=UNEVEN_BATCH, train_size=train_size,
                   beta=PIController(0.025 * model.module.n_latent), generator=torch.Generator().manual_seed(SEED))


def _uneven_job(rank: int, out: Path) -> None:
    """Train each of :data:`UNEVEN_SPLITS` (fixed latent draws); keep the history, the weights and the buffers."""
    rsample, torch.distributions.Normal.rsample = torch.distributions.Normal.rsample, _fixed_rsample
    for name, (train_size, _, _) in UNEVEN_SPLITS.items():
        trainer = _uneven_trainer(train_size)
        trainer.fit(UNEVEN_EPOCHS, progress=False)
        torch.save({"module": trainer.module.state_dict(), "history": trainer.state.history},
                   out / f"uneven-{name}{rank}.pt")
    torch.distributions.Normal.rsample = rsample


JOBS = {"step": _step_job, "full": _full_job, "killed": _killed_job, "uneven": _uneven_job}


def _worker(rank: int, store: str, out: str, jobs: list[str], world_size: int = 2) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    for job in jobs:
        JOBS[job](rank, Path(out))
        dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run the jobs in two gloo ranks; the last one ends with rank 1 killed (exit code 1)."""
    out = tmp_path_factory.mktemp("ddp")
    _adata().write_h5ad(out / "data.h5ad")
    with pytest.raises(mp.ProcessExitedException) as killed:
        mp.spawn(_worker, args=(str(out / "store"), str(out), ["step", "full", "killed"]), nprocs=2)
    assert (killed.value.error_index, killed.value.exit_code) == (1, 1), "only rank 1 was to end, by its kill"
    return out


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory) -> Path:
    """Run the uneven job in three gloo ranks."""
    out = tmp_path_factory.mktemp("ddp3")
    mp.spawn(_worker, args=(str(out / "store"), str(out), ["uneven"], UNEVEN_RANKS), nprocs=UNEVEN_RANKS)
    return out


# ---------------------------------------------------------------------- the tests
def test_two_ranks_take_the_step_of_one_process_on_the_union_batch(two_ranks, monkeypatch):
    """Loss, every gradient, the beta update and the validation loss of 2 ranks x 32 spots equal one process with
    the 64 spots, computed here directly from the module (same seeded split and permutation)."""
    monkeypatch.setattr(torch.distributions.Normal, "rsample", _fixed_rsample)
    model = spavae.SpaVAE(_adata(), **MODEL)
    generator = torch.Generator().manual_seed(SEED)
    train_index, val_index = split_indices(len(model.data), TRAIN_SIZE, generator)
    batch = train_index[torch.randperm(len(train_index), generator=generator)][:BATCH]
    model.module.train()
    out = model.module.loss(model.data.batch(batch), 10.0)
    out.loss.backward()
    controller = PIController(0.025 * model.module.n_latent)
    controller.step(float((out.kl_gp + out.kl_gauss).detach()) / BATCH)
    model.module.eval()
    with torch.no_grad():  # after the step, with the updated beta
        val = model.module.loss(model.data.batch(val_index), controller.beta)

    ranks = [torch.load(two_ranks / f"step{r}.pt", weights_only=False) for r in range(2)]
    reference = {name: p.grad for name, p in model.module.named_parameters() if p.grad is not None}
    for rank in ranks:
        assert rank["record"]["train_loss"] == pytest.approx(float(out.loss.detach()) / BATCH, rel=1e-6, abs=0.0)
        assert rank["record"]["train_kl_gp"] == pytest.approx(float(out.kl_gp.detach()) / BATCH, rel=1e-6, abs=0.0)
        assert rank["record"]["val_loss"] == pytest.approx(float(val.loss) / len(val_index), rel=1e-6, abs=0.0)
        assert rank["beta"] == pytest.approx(controller.beta, rel=1e-9, abs=0.0)
        assert sorted(rank["grads"]) == sorted(reference)
        for name, grad in reference.items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-6, atol=1e-9, msg=name)


def test_ranks_end_with_identical_weights_and_beta(two_ranks):
    """Global KL, losses and early stopping: both ranks hold the same beta, history and (best) weights."""
    first, second = (torch.load(two_ranks / f"full{r}.pt", weights_only=False) for r in range(2))
    assert first["beta"] == second["beta"]
    assert len(first["history"]) == 4
    drop = ("seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in first["history"]] == \
           [{k: v for k, v in h.items() if k not in drop} for h in second["history"]]
    assert first["module"].keys() == second["module"].keys()
    for name, tensor in first["module"].items():
        assert torch.equal(tensor, second["module"][name]), name
    assert first["history"][-1]["beta"] != first["history"][0]["beta"]  # the controller did move


def test_killed_two_rank_run_resumes_as_if_uninterrupted(two_ranks, capfd, monkeypatch):
    """`spavae resume --devices 2` (torchrun, started by the command line in this process) continues the killed run
    from its newest checkpoint (epoch 2) and ends with the history and weights of the uninterrupted run."""
    killed, full = experiment.RunFolder(two_ranks / "killed"), experiment.RunFolder(two_ranks / "full")
    assert [epoch for epoch, _ in killed.checkpoints()] == list(range(1, KILL_AFTER_EPOCH + 1))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(  # the ranks import the spavae under test
        [str(Path(spavae.__file__).parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]))
    code = cli.main(["resume", str(killed.root), "--devices", "2", "--no-evaluate"])
    stderr = capfd.readouterr().err
    assert code == 0, stderr[-3000:]
    assert f"resuming {killed.root} from checkpoint-epoch{KILL_AFTER_EPOCH}.pth on 2 processes" in stderr
    resumed = pd.read_csv(killed.history).drop(columns="seconds")
    uninterrupted = pd.read_csv(full.history).drop(columns="seconds")
    assert list(resumed["epoch"]) == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=False, rtol=1e-12)
    last = [torch.load(run.checkpoint_file(4), weights_only=False)["trainer"] for run in (killed, full)]
    assert len(last[0]["rng"]["ranks"]) == 2
    for name, tensor in last[1]["module"].items():
        np.testing.assert_array_equal(last[0]["module"][name].numpy(), tensor.numpy(), err_msg=name)


@pytest.mark.parametrize("split", UNEVEN_SPLITS)
def test_three_ranks_on_uneven_batches_train_as_one_process(three_ranks, monkeypatch, split):
    """Batches that do not split evenly over 3 ranks and a last chunk of 2 spots (fewer than the ranks), in the
    validation or in the training set: every rank's history (training and validation losses, beta) and final
    weights and batch-norm running statistics equal one process's (on one thread, as the ranks).

    The tolerance is that of rounding: the biases of the layers before a batch norm have no gradient in exact
    arithmetic, so Adam moves them by the rounding noise of the split sums (about 1e-8 here).
    """
    train_size, train_batches, val_batches = UNEVEN_SPLITS[split]
    batches = _uneven_trainer(train_size)
    assert [len(index) for index in batches._batches(batches.train_index, True, batches.drop_last)] == train_batches
    assert [len(index) for index in batches._batches(batches.val_index, False, False)] == val_batches
    monkeypatch.setattr(torch.distributions.Normal, "rsample", _fixed_rsample)
    torch.set_num_threads(1)  # conftest sets 2 threads before each test
    trainer = _uneven_trainer(train_size)
    trainer.fit(UNEVEN_EPOCHS, progress=False)
    reference = trainer.module.state_dict()
    assert any(name.endswith("running_var") for name in reference)
    for rank in range(UNEVEN_RANKS):
        ranked = torch.load(three_ranks / f"uneven-{split}{rank}.pt", weights_only=False)
        assert len(ranked["history"]) == len(trainer.state.history) == UNEVEN_EPOCHS
        for got, want in zip(ranked["history"], trainer.state.history):
            assert got.keys() == want.keys()
            for key in sorted(want.keys() - {"seconds"}):
                assert got[key] == pytest.approx(want[key], rel=1e-7, abs=1e-9), (rank, got["epoch"], key)
        assert ranked["module"].keys() == reference.keys()
        for name, tensor in reference.items():
            torch.testing.assert_close(ranked["module"][name], tensor, rtol=1e-7, atol=1e-7, msg=f"{rank} {name}")

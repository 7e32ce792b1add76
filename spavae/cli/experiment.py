"""``spavae train``, ``spavae resume`` and ``spavae evaluate``: experiment runs from a config file
(:mod:`spavae.experiment`)."""

from __future__ import annotations

import argparse
import json

from spavae.cli.parser import devices_value


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train``, ``resume`` and ``evaluate`` commands."""
    formatter = argparse.RawDescriptionHelpFormatter
    log_help = ("JSON logging.config.dictConfig file replacing the default logging (console + log/train.log); "
                "relative handler filenames are placed in the run's log/ folder")
    devices_help = ("train one model data-parallel over N processes on this machine (torchrun; gloo on CPU, one GPU "
                    "per process with nccl); the batch size stays the global one (docs/distributed.md)")
    train = sub.add_parser(
        "train", help="train an experiment config into <save_dir>/<name>/, then evaluate it", formatter_class=formatter,
        description="Validate CONFIG (JSON, or YAML with PyYAML), train it and write the run folder:\n"
                    "  checkpoint/config.json, checkpoint/checkpoint-epoch<N>.pth, checkpoint/model_best.pth\n"
                    "  log/train.log, log/history.csv, log/events.out.tfevents.* (TensorBoard)\n"
                    "  results/ (metrics.json, latent.csv, domains.csv, figures; skipped with --no-evaluate)\n"
                    "Every key, its default and meaning: docs/experiments.md.")
    train.add_argument("-c", "--config", required=True, help="experiment config file (.json, .yaml or .yml)")
    train.add_argument("--log-config", metavar="FILE", help=log_help)
    train.add_argument("--data", metavar="PATH", help="input .h5/.h5ad file; overrides data.path of the config")
    train.add_argument("--name", help="run name (the folder under save_dir); overrides name of the config")
    train.add_argument("--seed", type=int, help="overrides trainer.seed of the config")
    train.add_argument("--threads", type=int, help="torch CPU threads; overrides trainer.threads of the config")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key, VALUE read as JSON (repeatable), e.g. "
                            "--set trainer.max_epochs=50 --set model.encoder_layers=[64,32]")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    train.add_argument("--no-evaluate", action="store_true", help="do not evaluate the run after training")
    train.add_argument("--quiet", action="store_true", help="no progress bar (sets trainer.progress to false)")
    train.add_argument("--devices", type=devices_value, default=1, metavar="N", help=devices_help)
    train.set_defaults(handler=train_command)
    resume = sub.add_parser(
        "resume", help="continue an interrupted run from its newest checkpoint, then evaluate it",
        formatter_class=formatter,
        description="Load RUN_DIR/checkpoint/config.json and the newest readable checkpoint-epoch<N>.pth, restore the "
                    "weights, optimiser, scheduler, beta controller, random states and history, and train on until "
                    "trainer.max_epochs or early stopping, exactly as the uninterrupted run would have. A finished "
                    "run is not trained further. TensorBoard events written after the checkpoint are dropped.")
    resume.add_argument("run_dir", metavar="RUN_DIR", help="the run folder, e.g. experiments/151507")
    resume.add_argument("--log-config", metavar="FILE", help=log_help)
    resume.add_argument("--no-evaluate", action="store_true", help="do not evaluate the run after training")
    resume.add_argument("--devices", type=devices_value, default=1, metavar="N", help=devices_help)
    resume.set_defaults(handler=resume_command)
    evaluate = sub.add_parser(
        "evaluate", help="latent, domains, scores and figures of a trained run", formatter_class=formatter,
        description="Embed all spots with RUN_DIR/checkpoint/model_best.pth, cluster the latent (KMeans, then "
                    "optional neighbour refinement) and write RUN_DIR/results/: metrics.json (ARI/NMI on the "
                    "labelled spots, on the test spots and the k-NN accuracy when the run holds out a test set), "
                    "latent.csv, domains.csv, domains.png (found vs ground truth), umap.png, markers.png (raw vs "
                    "denoised marker genes) and training.png. Settings: the config's evaluation section.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="the run folder, e.g. experiments/151507")
    evaluate.add_argument("--log-config", metavar="FILE", help=log_help)
    evaluate.set_defaults(handler=evaluate_command)


def train_command(args: argparse.Namespace) -> None:
    """The ``train`` command."""
    from spavae import experiment
    from spavae.config import load_config

    overrides = list(args.set)
    for key, value in (("data.path", args.data), ("name", args.name), ("trainer.seed", args.seed),
                       ("trainer.threads", args.threads)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if args.quiet:
        overrides.append("trainer.progress=false")
    config = load_config(args.config, overrides)
    experiment.train(config, log_config=args.log_config, overwrite=args.overwrite,
                     evaluate_after=not args.no_evaluate)


def resume_command(args: argparse.Namespace) -> None:
    """The ``resume`` command."""
    from spavae import experiment

    experiment.resume(args.run_dir, log_config=args.log_config, evaluate_after=not args.no_evaluate)


def evaluate_command(args: argparse.Namespace) -> None:
    """The ``evaluate`` command."""
    from spavae import experiment

    print(json.dumps(experiment.evaluate(args.run_dir, log_config=args.log_config)), flush=True)

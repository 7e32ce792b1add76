"""Experiment configs: the original's defaults, clear errors naming the key, overrides, YAML, shipped examples, docs."""

import json
from pathlib import Path

import pytest

from spavae.config import ConfigError, config_from_dict, config_reference, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "Human_DLPFC").glob("sample_*/config.json"))


def test_defaults_are_the_originals():
    config = config_from_dict({})
    assert (config.optimizer.lr, config.optimizer.weight_decay) == (1e-3, 1e-6)
    assert (config.trainer.max_epochs, config.trainer.patience, config.trainer.train_size) == (5000, 200, 0.95)
    assert config.scheduler.type == "none" and config.trainer.batch_size == "auto"
    model = config.model
    assert (model.n_gp, model.n_gauss, model.encoder_layers, model.decoder_layers) == (2, 8, [128, 64], [128])
    assert (model.kernel, model.kernel_scale, model.inducing, model.inducing_steps, model.loc_range) == \
        ("cauchy", 20.0, "grid", 6, 20.0)
    assert (model.beta.init, model.beta.min, model.beta.max, model.beta.kl_target) == (10.0, 4.0, 25.0, 0.025)
    assert config.train_kwargs()["lr_scheduler"] is None


@pytest.mark.parametrize("raw,message", [
    ({"model": {"kernl": "eq"}}, "model.kernl: unknown key; did you mean 'kernel'?"),
    ({"trainer": {"foo": 1}}, "trainer.foo: unknown key; known keys: max_epochs"),
    ({"model": {"kernel": "rbf"}}, "model.kernel: expected one of 'cauchy', 'eq', got 'rbf'"),
    ({"trainer": {"max_epochs": "10"}}, "trainer.max_epochs: expected an integer, got '10'"),
    ({"trainer": {"max_epochs": 2.5}}, "trainer.max_epochs: expected an integer"),
    ({"trainer": {"progress": 1}}, "trainer.progress: expected true/false, got 1"),
    ({"model": {"encoder_layers": [64, "a"]}}, "model.encoder_layers: expected a list of integers"),
    ({"model": {"beta": {"init": None}}}, "model.beta.init: expected a finite number, got None"),
    ({"trainer": {"train_size": 1.5}}, "trainer.train_size: must be in (0, 1], got 1.5"),
    ({"optimizer": {"lr": 0}}, "optimizer.lr: must be > 0, got 0"),
    ({"trainer": {"batch_size": 1}}, "trainer.batch_size: must be >= 2 or 'auto', got 1"),
    ({"scheduler": {"factor": 1.0}}, "scheduler.factor: must be in (0, 1), got 1.0"),
    ({"data": {"test_size": 1}}, "data.test_size: must be in [0, 1), got 1"),
    ({"model": {"encoder_layers": [64, 0]}}, "model.encoder_layers: every layer width must be >= 1"),
    ({"name": "a/b"}, "name: must be a plain folder name"),
    ({"model": {"beta": {"min": 30}}}, "model.beta.min: must not exceed model.beta.max"),
    ({"model": {"n_inducing": 50}}, "model.n_inducing: only used with model.inducing = 'kmeans'"),
    ({"model": 3}, "model: expected a section"),
])
def test_invalid_values_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert str(err.value).startswith(message), str(err.value)


def test_comments_overrides_and_roundtrip(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"_comment": "ignored", "model": {"_why": "also ignored", "encoder": "conv"}}))
    config = load_config(path, ["trainer.seed=3", "name=run1", "model.encoder_layers=[64,32]", "data.path=x.h5"])
    assert (config.trainer.seed, config.name, config.model.encoder_layers) == (3, "run1", [64, 32])
    assert config.data.path == "x.h5" and config.model.encoder == "conv"
    config.save(tmp_path / "saved.json")
    assert load_config(tmp_path / "saved.json") == config
    with pytest.raises(ConfigError, match="trainer.seed: expected an integer, got 'x'"):
        load_config(path, ["trainer.seed=x"])
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_config(path, ["trainer.seed"])


def test_file_errors_and_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{'single': quotes}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be an object"):
        load_config(bad)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model:\n  kernel: eq  # a real comment\nscheduler:\n  type: plateau\n")
    config = load_config(yaml_file)
    assert config.model.kernel == "eq"
    assert config.train_kwargs()["lr_scheduler"] == {"factor": 0.75, "patience": 15, "min_lr": 0.0}


def test_example_configs_are_valid_and_fit_the_brief():
    names = {path.parent.name: load_config(path) for path in EXAMPLES}
    assert set(names) == {"sample_151507", "sample_151510", "sample_151673"}
    first, second = names["sample_151507"], names["sample_151510"]
    assert (first.model.encoder, first.model.kernel, first.data.test_size) == ("dense", "cauchy", 0.1)
    assert (second.model.encoder, second.model.kernel, second.data.test_size) == ("conv", "eq", 0.0)
    for config in names.values():
        assert config.trainer.max_epochs <= 400 and config.evaluation.lattice == "visium_array"


def test_docs_list_every_key_with_its_default():
    text = (ROOT / "docs" / "experiments.md").read_text()
    rows = config_reference()
    assert len(rows) == len({key for key, _, _ in rows}) > 50
    for key, default, _ in rows:
        assert f"| `{key}` | `{default}` |" in text, key

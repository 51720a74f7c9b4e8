"""Run settings (`training.settings`): preset < config file < overrides (and bits) < key=value assignments."""

from __future__ import annotations

import pytest

from mecoq_hf.models.mecoq.configuration_mecoq import num_codebooks_for_bits
from mecoq_hf.training.settings import parse_assignment, read_config_file, resolve_run_settings

CONFIG = """\
model:
  backbone: test_efficientnet
  embedding_dim: 16
  num_codebooks: 2
training:
  num_epochs: 1
  learning_rate: 5e-2   # YAML 1.1 reads this as a string: it becomes a float
data:
  source: fashion-mnist
  num_train: 64
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG)
    return path


def test_each_layer_overrides_the_one_before(config_file, tmp_path):
    config, training, data = resolve_run_settings(
        preset="official",
        config_file=config_file,
        overrides={"model": {"image_size": 48}, "training": {"output_dir": str(tmp_path), "seed": 7},
                   "data": {"seed": 7}},
        assignments=["model.temperature=0.3", "weight_decay=1e-3", "data.per_class=false"],
        bits=32,
    )  # fmt: skip
    assert config.trainable_codebooks is False and config.contrastive_reduction == "broadcast"  # the preset
    assert config.backbone == "test_efficientnet"  # the file beats the preset
    assert (config.num_codebooks, config.embedding_dim) == (4, 32)  # 32 bits keep D = 16 / 2 = 8
    assert config.image_size == 48 and config.temperature == 0.3
    assert training.learning_rate == 0.05 and isinstance(training.learning_rate, float)
    assert training.weight_decay == 1e-3 and training.seed == 7 and training.num_epochs == 1
    assert data.seed == 7 and data.per_class is False and data.num_train == 64
    assert training.output_dir == str(tmp_path)


def test_bits_keep_the_presets_subvector_width_unless_the_width_is_given(tmp_path):
    required = {"training": {"output_dir": str(tmp_path)}, "data": {"source": "x"}}
    config = resolve_run_settings(preset="cifar10-ii-32", overrides=required, bits=16).config
    assert (config.num_codebooks, config.embedding_dim, config.backbone) == (2, 24, "vgg16")  # D = 48 / 4
    overrides = {**required, "model": {"embedding_dim": 40}}
    config = resolve_run_settings(preset="cifar10-ii-32", overrides=overrides, bits=16).config
    assert (config.num_codebooks, config.embedding_dim) == (2, 40)
    assert resolve_run_settings(overrides=required, bits=64).config.num_codebooks == 8  # K = 256 by default


@pytest.mark.parametrize(
    ("preset", "weight_decay", "top_k", "trainable"),
    [("cifar10-i-32", 1e-3, 1000, 2), ("cifar10-ii-32", 5e-3, 1000, 2), ("flickr25k-16", 0.1, 5000, "frozen"),
     ("nuswide-64", 1e-2, 5000, "frozen")],
)  # fmt: skip
def test_a_reference_script_preset_carries_the_training_arguments_of_its_run(
    tmp_path, preset, weight_decay, top_k, trainable
):
    required = {"training": {"output_dir": str(tmp_path)}, "data": {"source": "x"}}
    config, training, _ = resolve_run_settings(preset=preset, overrides=required)
    assert (training.weight_decay, training.top_k, config.backbone_trainable) == (
        weight_decay,
        top_k,
        trainable,
    )
    assert training.backbone_lr_scale == 1.0  # what the reference's scheduler ran (docs/method.md §13.9)
    assert (training.learning_rate, training.batch_size, training.num_epochs, training.patience) == (
        0.01, 128, 50, 10
    )  # fmt: skip
    assert config.backbone_kwargs == {"drop_rate": 0.5} and config.backbone == "vgg16"
    # The file, the overrides and the assignments still win over the preset's training arguments.
    overrides = {**required, "training": {**required["training"], "weight_decay": 0.5}}
    assert resolve_run_settings(preset=preset, overrides=overrides).training.weight_decay == 0.5
    assert (
        resolve_run_settings(preset=preset, overrides=required, assignments=["top_k=10"]).training.top_k == 10
    )
    # official and paper carry no training arguments.
    assert resolve_run_settings(preset="paper", overrides=required).training.weight_decay == 1e-3


def test_caller_defaults_lie_below_the_preset(tmp_path):
    required = {"training": {"output_dir": str(tmp_path)}, "data": {"source": "x"}}
    defaults = {"model": {"backbone_trainable": 1}, "training": {"cached_views": 8, "top_k": 7}}
    config, training, _ = resolve_run_settings(preset="paper", overrides=required, defaults=defaults)
    assert (config.backbone_trainable, training.cached_views, training.top_k) == (1, 8, 7)
    config, training, _ = resolve_run_settings(preset="cifar10-i-16", overrides=required, defaults=defaults)
    assert (config.backbone_trainable, training.cached_views, training.top_k) == (2, 8, 1000)
    with pytest.raises(ValueError, match="Unknown settings section 'optim'"):
        resolve_run_settings(overrides=required, defaults={"optim": {}})


def test_the_file_preset_applies_and_an_unknown_preset_is_named(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"preset": "paper", "training": {"output_dir": "out"}, "data": {"source": "x"}}')
    assert resolve_run_settings(config_file=path).config.normalize_memory is True
    with pytest.raises(ValueError, match="Unknown preset 'papr'. Available presets: .*paper"):
        resolve_run_settings(preset="papr", config_file=path)


def test_launcher_precision_is_the_default(config_file, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    overrides = {"training": {"output_dir": str(tmp_path)}}
    assert (
        resolve_run_settings(config_file=config_file, overrides=overrides).training.mixed_precision == "bf16"
    )
    overrides["training"]["mixed_precision"] = "no"
    assert resolve_run_settings(config_file=config_file, overrides=overrides).training.mixed_precision == "no"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"assignments": ["model.temprature=0.3"]}, "Did you mean 'temperature'"),
        ({"assignments": ["flux=3"]}, "is not a model, training or data setting"),
        ({"assignments": ["seed=3"]}, r"'seed' exists in \['training', 'data'\]"),
        ({"assignments": ["optim.lr=3"]}, "unknown section 'optim'"),
        ({"assignments": ["temperature"]}, "expects key=value"),
        ({"overrides": {"optim": {"lr": 3}}}, "Unknown settings section 'optim'"),
        ({"bits": 12}, r"12 bits is not a multiple of log2\(K\) = 8"),
    ],
)
def test_bad_settings_are_named(config_file, tmp_path, arguments, message):
    overrides = {"training": {"output_dir": str(tmp_path)}, **arguments.pop("overrides", {})}
    with pytest.raises(ValueError, match=message):
        resolve_run_settings(config_file=config_file, overrides=overrides, **arguments)


def test_a_run_needs_an_output_folder_and_a_source(tmp_path):
    with pytest.raises(ValueError, match=r"No output folder.*--output-dir DIR"):
        resolve_run_settings(overrides={"data": {"source": "x"}})
    with pytest.raises(ValueError, match=r"No dataset.*--dataset SOURCE"):
        resolve_run_settings(overrides={"training": {"output_dir": str(tmp_path)}})


def test_config_files_are_checked(tmp_path):
    bad = {
        "run.txt": "model: {}",
        "list.yaml": "- a\n- b\n",
        "typo.yaml": "modle: {}\n",
        "section.yaml": "model: 3\n",
    }
    messages = {
        "run.txt": "must end in .json, .yaml or .yml",
        "list.yaml": "must hold a mapping",
        "typo.yaml": "Did you mean 'model'",
        "section.yaml": "must be a mapping of settings",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises((ValueError, TypeError), match=messages[name]):
            read_config_file(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_config_file(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert read_config_file(tmp_path / "empty.yaml") == {}


def test_assignments_are_parsed_as_yaml():
    assert parse_assignment("model.memory_start_epoch=null") == ("model", "memory_start_epoch", None)
    assert parse_assignment("cached_views=6") == ("training", "cached_views", 6)
    assert parse_assignment("data.per_class=false") == ("data", "per_class", False)


def test_bits_to_codebooks():
    assert num_codebooks_for_bits(32, 256) == 4 and num_codebooks_for_bits(8, 16) == 2
    for bits, codebook_size in ((12, 256), (0, 256), (32, 100), (32, 1)):
        with pytest.raises(ValueError, match="is not a multiple of log2"):
            num_codebooks_for_bits(bits, codebook_size)

"""The `mecoq` command line on real Fashion-MNIST images, a tiny real backbone and real faiss.

One small model is trained once per module (64 images, one epoch); the other commands run on it in-process
through `cli.main`, and their outputs are checked against the library computed independently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from mecoq_hf import MeCoQConfig, MeCoQModel, cli
from mecoq_hf.cli import build_parser
from mecoq_hf.cli.train import settings_from_flags
from mecoq_hf.data.loaders import make_eval_dataloader
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.data.splits import SplitDefinition
from mecoq_hf.data.transforms import build_eval_transform
from mecoq_hf.encoding import encode_dataset
from mecoq_hf.retrieval.evaluation import evaluate_codes
from mecoq_hf.retrieval.index import CodeIndex
from mecoq_hf.retrieval.scoring import SearchSettings
from mecoq_hf.training import TrainingArguments

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_CONFIG = """\
model:
  backbone: test_efficientnet
  backbone_weights: null
  image_size: 32
  embedding_dim: 16
  num_codebooks: 2
  codebook_size: 256
training:
  num_epochs: 1
  batch_size: 32
  learning_rate: 5e-2   # YAML 1.1 reads this as a string: the CLI turns it into a float
  report_to: []
  top_k: 100
data:
  source: fashion-mnist
  limit: 400
  num_query: 20
  num_validation: 20
  num_train: 64
  seed: 0
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, config_file) -> Path:
    """A model folder written by `mecoq train` (about 10 s on two CPU cores)."""
    warnings.simplefilter("ignore")
    output_dir = tmp_path_factory.mktemp("run") / "model"
    status = cli.main(
        ["train", "--config", str(config_file), "--output-dir", str(output_dir), "--no-progress"]
    )
    assert status == 0
    return output_dir


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_png(path: Path) -> Image.Image:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = Image.open(path)
    image.load()
    return image


def independent_map(model_dir: Path, definition: SplitDefinition, top_k: int) -> float:
    """mAP@top_k of the query split against the database split, computed with the library directly."""
    model = MeCoQModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    splits = definition.build()
    transform = build_eval_transform(model.backbone.data_config)
    queries = encode_dataset(model, make_eval_dataloader(splits["query"], transform, 64), method="embed",
                             show_progress_bar=False)  # fmt: skip
    database = encode_dataset(model, make_eval_dataloader(splits["database"], transform, 64), method="encode",
                              show_progress_bar=False)  # fmt: skip
    settings = SearchSettings.from_config(model.config)
    return evaluate_codes(queries.outputs, database.outputs, model.normalized_codebooks(), queries.labels,
                          database.labels, top_k, settings=settings)  # fmt: skip


# help


def test_help_runs_as_a_module_and_as_the_console_script():
    commands = [[sys.executable, "-m", "mecoq_hf.cli", "--help"]]
    console_script = shutil.which("mecoq", path=os.path.dirname(sys.executable))
    if console_script:  # present once the package is pip-installed into the environment
        commands.append([console_script, "--help"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for command in commands:
        result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.startswith("usage: mecoq")
        for name in ("train", "evaluate", "encode", "index", "search", "push", "push-index"):
            assert re.search(rf"^\s+{re.escape(name)}\b", result.stdout, re.MULTILINE), name


@pytest.mark.parametrize(
    "command",
    [["train"], ["evaluate"], ["encode"], ["index", "build"], ["search"], ["card"], ["push"], ["push-index"]],
)
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mecoq {' '.join(command)}")
    assert "--debug" in out


# configuration


def test_flags_and_set_override_the_config_file_and_the_preset(config_file, tmp_path):
    args = build_parser().parse_args([
        "train", "--config", str(config_file), "--preset", "official", "--output-dir", str(tmp_path),
        "--bits", "32", "--image-size", "48", "--seed", "7", "--set", "model.temperature=0.3",
        "--set", "weight_decay=1e-3", "--set", "data.per_class=false", "--dataset", "fashion-mnist",
    ])  # fmt: skip
    config, training_args, definition = settings_from_flags(args)
    assert config.trainable_codebooks is False and config.contrastive_reduction == "broadcast"  # the preset
    assert config.backbone == "test_efficientnet"  # the file beats the preset
    assert (config.num_codebooks, config.embedding_dim) == (4, 32)  # --bits 32 keeps D = 16 / 2 = 8
    assert config.image_size == 48 and config.temperature == 0.3
    assert training_args.learning_rate == 0.05 and isinstance(training_args.learning_rate, float)
    assert training_args.weight_decay == 1e-3 and training_args.seed == 7
    assert definition.seed == 7 and definition.per_class is False and definition.num_train == 64
    # --bits keeps the preset's sub-vector width: cifar10-ii-32 has d = 48 over M = 4 (D = 12).
    args = build_parser().parse_args(["train", "--preset", "cifar10-ii-32", "--bits", "16", "--dataset", "x",
                                      "--output-dir", str(tmp_path)])  # fmt: skip
    config, _, _ = settings_from_flags(args)
    assert (config.num_codebooks, config.embedding_dim, config.backbone) == (2, 24, "vgg16")
    # --embedding-dim next to --bits is taken as given; --resume and --no-progress reach the arguments.
    args = build_parser().parse_args(["train", "--preset", "cifar10-ii-32", "--bits", "16", "--embedding-dim",
                                      "40", "--dataset", "x", "--output-dir", str(tmp_path), "--resume",
                                      "--no-progress"])  # fmt: skip
    config, training_args, _ = settings_from_flags(args)
    assert (config.num_codebooks, config.embedding_dim) == (2, 40)
    assert training_args.resume is True and training_args.progress_bar is False


def test_train_defaults_to_the_last_backbone_group_at_the_heads_rate(config_file, tmp_path, capsys):
    """The CLI's own defaults (chosen on the validation split, BENCHMARKS.md); Python keeps the config's."""
    base = ["train", "--config", str(config_file), "--output-dir", str(tmp_path)]
    config, training_args, _ = settings_from_flags(build_parser().parse_args(base))
    assert (config.backbone_trainable, training_args.backbone_lr_scale) == (1, 1.0)
    assert MeCoQConfig().backbone_trainable == "frozen" and TrainingArguments("x").backbone_lr_scale == 1e-3
    for given, expected in (("frozen", "frozen"), ("all", "all"), ("2", 2)):
        args = build_parser().parse_args([*base, "--backbone-trainable", given])
        assert settings_from_flags(args).config.backbone_trainable == expected
    args = build_parser().parse_args([*base, "--set", "model.backbone_trainable=frozen"])
    assert settings_from_flags(args).config.backbone_trainable == "frozen"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--backbone-trainable", "0"])
    assert "expected 'frozen', 'all' or a number of layer groups >= 1, got '0'" in capsys.readouterr().err


def test_a_reference_preset_resolves_to_its_runs_settings_and_they_are_shown(tmp_path):
    from mecoq_hf.training import describe_run_settings

    args = build_parser().parse_args(["train", "--preset", "cifar10-i-32", "--dataset", "fashion-mnist",
                                      "--output-dir", str(tmp_path)])  # fmt: skip
    settings = settings_from_flags(args)  # settings only: VGG-16 weights are not available offline
    config, training_args, _ = settings
    assert (config.backbone, config.backbone_trainable, config.backbone_kwargs) == (
        "vgg16",
        2,
        {"drop_rate": 0.5},
    )
    assert (config.num_codebooks, config.embedding_dim, config.temperature, config.memory_start_epoch) == (
        4, 64, 0.4, 3
    )  # fmt: skip
    assert (training_args.weight_decay, training_args.top_k, training_args.backbone_lr_scale) == (
        1e-3,
        1000,
        1.0,
    )
    assert (training_args.learning_rate, training_args.num_epochs, training_args.patience) == (0.01, 50, 10)
    shown = describe_run_settings(settings, "cifar10-i-32")
    for text in (
        "preset cifar10-i-32",
        "backbone='vgg16'",
        "backbone_kwargs={'drop_rate': 0.5}",
        "backbone_trainable=2",
        "weight_decay=0.001",
        "top_k=1000",
        "backbone_lr_scale=1.0",
    ):
        assert text in shown, text  # fmt: skip
    args = build_parser().parse_args(["train", "--preset", "cifar10-i-32", "--dataset", "x", "--epochs", "5",
                                      "--output-dir", str(tmp_path), "--cached-views", "4"])  # fmt: skip
    assert settings_from_flags(args).training.num_epochs == 5  # a flag beats the preset's run
    assert settings_from_flags(args).training.cached_views == 4


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the cached-views default is for machines without a GPU"
)
def test_train_on_a_cpu_takes_cached_views_unless_told_otherwise(config_file, tmp_path, capsys):
    warnings.simplefilter("ignore")
    command = ["train", "--config", str(config_file), "--no-progress", "--set", "data.num_train=32"]
    status, out, _ = run_cli(command + ["--output-dir", str(tmp_path / "auto")], capsys)
    assert status == 0 and "No GPU: training on 8 cached augmented views per image" in out
    assert "Settings (no preset" in out and "cached_views=8" in out
    assert json.loads((tmp_path / "auto" / "training_args.json").read_text())["cached_views"] == 8
    status, out, _ = run_cli(
        command + ["--output-dir", str(tmp_path / "fresh"), "--cached-views", "0"], capsys
    )
    assert status == 0 and "No GPU: training on fresh augmentations every step" in out
    assert "Faster: --cached-views 8" in out
    assert json.loads((tmp_path / "fresh" / "training_args.json").read_text())["cached_views"] == 0
    all_layers = command + ["--output-dir", str(tmp_path / "all"), "--set", "model.backbone_trainable=all",
                            "--max-steps", "1"]  # fmt: skip
    status, out, _ = run_cli(all_layers, capsys)
    assert status == 0 and "--set model.backbone_trainable=2 --cached-views 8" in out


# the pipeline: train -> evaluate -> index -> search -> encode


def test_train_writes_a_model_folder_with_its_splits(trained):
    files = set(os.listdir(trained))
    assert {
        "config.json",
        "model.safetensors",
        "codebooks.safetensors",
        "splits.json",
        "run_record.json",
    } <= files
    definition, record = SplitDefinition.read(trained / "splits.json")
    assert (definition.source, definition.limit, definition.seed, definition.protocol) == (
        "fashion-mnist",
        400,
        0,
        "random",
    )
    assert record["sizes"] == {"query": 20, "validation": 20, "database": 360, "train": 64}
    splits = definition.build()
    definition.check_against(splits, record, fix="")  # the record rebuilds to the same items
    query, database = set(splits["query"]["index"]), set(splits["database"]["index"])
    validation, train = set(splits["validation"]["index"]), set(splits["train"]["index"])
    assert not query & database and not validation & database and not query & validation
    assert train <= database
    config = json.loads((trained / "config.json").read_text())
    assert (config["backbone"], config["num_codebooks"], config["embedding_dim"]) == (
        "test_efficientnet",
        2,
        16,
    )
    run_record = json.loads((trained / "run_record.json").read_text())
    assert (
        run_record["dataset"]["name"] == "fashion-mnist"
        and run_record["training_args"]["learning_rate"] == 0.05
    )
    assert 0.0 <= run_record["metrics"]["best_validation_map"] <= 1.0
    assert run_record["dataset"]["license"] == "mit"  # known for the data source, not hard-coded in the CLI
    assert run_record["dataset"]["protocol"] == definition.describe(splits)


def test_evaluate_writes_metrics_and_a_pr_curve(trained, tmp_path, capsys):
    metrics, curve = tmp_path / "metrics.json", tmp_path / "pr.png"
    status, out, _ = run_cli(["evaluate", str(trained), "--output", str(metrics), "--pr-curve", str(curve),
                              "--no-progress"], capsys)  # fmt: skip
    assert status == 0
    result = json.loads(metrics.read_text())
    assert result["top_k"] == 100 and result["distance"] == "asymmetric" and result["bits"] == 16
    assert result["dataset"]["num_queries"] == 20 and result["dataset"]["num_database"] == 360
    definition, _ = SplitDefinition.read(trained / "splits.json")
    expected = independent_map(trained, definition, top_k=100)
    assert result["metrics"]["map@100"] == pytest.approx(expected, abs=1e-9)
    assert f"{expected:.4f}" in out
    assert assert_png(curve).size[0] > 100


def test_card_reports_the_evaluated_map_as_model_index(trained, tmp_path, capsys):
    from huggingface_hub import ModelCard

    metrics, card_path = tmp_path / "metrics.json", tmp_path / "card" / "README.md"
    assert run_cli(["evaluate", str(trained), "--output", str(metrics), "--no-progress"], capsys)[0] == 0
    status, out, _ = run_cli(["card", str(trained), "--metrics", str(metrics), "--repo-id", "me/tiny",
                              "--output", str(card_path)], capsys)  # fmt: skip
    assert status == 0 and str(card_path) in out
    card = ModelCard.load(card_path)
    expected = json.loads(metrics.read_text())["metrics"]["map@100"]
    values = [result.metric_value for result in card.data.eval_results]
    assert any(value == pytest.approx(expected, abs=1e-4) for value in values)
    assert "me/tiny" in card.text and "16-bit code" in card.text


def test_evaluate_with_the_faiss_pq_baseline(trained, tmp_path, capsys):
    metrics = tmp_path / "metrics.json"
    status, out, _ = run_cli(["evaluate", str(trained), "--baseline", "pq", "--train-size", "256", "--map-k",
                              "50", "--output", str(metrics), "--no-progress"], capsys)  # fmt: skip
    assert status == 0
    result = json.loads(metrics.read_text())
    assert "differ from the ones recorded" in out  # new split options: a different training split, on purpose
    pq = result["baselines"]["pq"]
    assert pq["num_train"] == 256 and pq["feature_dim"] == 256 and "IndexPQ(M=2" in pq["method"]
    assert 0.1 < pq["map@50"] <= 1.0 and 0.0 < result["metrics"]["map@50"] <= 1.0
    assert re.search(r"faiss PQ\s+0\.\d{4}", out) and re.search(r"MeCoQ\s+0\.\d{4}", out)
    # The query and database splits do not depend on --train-size: the MeCoQ number is the recorded splits'.
    definition, _ = SplitDefinition.read(trained / "splits.json")
    assert result["metrics"]["map@50"] == pytest.approx(
        independent_map(trained, definition, top_k=50), abs=1e-9
    )


def test_index_build_then_search_prints_ranked_results_and_draws_a_grid(trained, tmp_path, capsys):
    index_path = tmp_path / "indexes" / "fmnist.safetensors"
    status, out, _ = run_cli(["index", "build", str(trained), "--dataset", "fashion-mnist", "--limit", "100",
                              "--output", str(index_path), "--no-progress"], capsys)  # fmt: skip
    assert status == 0 and "Indexed 100 images" in out
    index, sidecar = CodeIndex.load_with_sidecar(index_path)  # the labels are inside the index file
    assert index.ntotal == 100 and torch.equal(index.ids, torch.arange(100))
    images = load_fashion_mnist("train", limit=100)
    assert sidecar.labels == images["label"] and sidecar.class_names[0] == "T-shirt/top"

    query_path, grid_path = tmp_path / "query.png", tmp_path / "grid.png"
    images[7]["image"].save(query_path)  # a database image, saved losslessly
    status, out, _ = run_cli(["search", str(index_path), "--image", str(query_path), "--top-k", "5",
                              "--grid", str(grid_path)], capsys)  # fmt: skip
    assert status == 0
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+\d+\s+\d+\s+-?\d", line)]
    assert [int(row[0]) for row in rows] == [1, 2, 3, 4, 5]
    ids, scores = [int(row[1]) for row in rows], [float(row[2]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    names = images.features["label"].names
    assert [" ".join(row[3:]) for row in rows] == [names[images[i]["label"]] for i in ids]
    # The image's own code maximises every sub-space term, so its score is the best one: it is listed
    # unless more than five items share that best score.
    assert 7 in ids or scores[-1] == scores[0]
    grid = assert_png(grid_path)
    assert grid.size[0] > 2 * grid.size[1]  # one row: the query and five results


def test_unlabelled_image_folder_is_indexed_with_its_paths(trained, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for number, image in enumerate(load_fashion_mnist("test", limit=12)["image"]):
        image.save(folder / f"item_{number:02d}.png")
    index_path = tmp_path / "photos.safetensors"
    build = [
        "index",
        "build",
        str(trained),
        "--dataset",
        str(folder),
        "--output",
        str(index_path),
        "--no-progress",
    ]
    status, _, err = run_cli(build, capsys)
    assert status == 2 and "--label-column none" in err  # a flat folder has no class sub-folders
    status, _, _ = run_cli([*build, "--label-column", "none"], capsys)
    assert status == 0
    _, sidecar = CodeIndex.load_with_sidecar(index_path)
    assert sidecar.labels is None and sidecar.data["source"] == str(folder)
    assert sorted(Path(path).name for path in sidecar.paths) == [f"item_{n:02d}.png" for n in range(12)]
    status, out, _ = run_cli(["search", str(index_path), "--image", str(folder / "item_03.png"), "--top-k",
                              "3", "--grid", str(tmp_path / "grid.png")], capsys)  # fmt: skip
    assert status == 0
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+\d+\s+\d+\s+-?\d", line)]
    assert len(rows) == 3 and all(row[3] == "-" and row[4].startswith(str(folder)) for row in rows)
    assert_png(tmp_path / "grid.png")


def test_encode_matches_the_model_and_stores_ids_and_labels(trained, tmp_path, capsys):
    output = tmp_path / "codes.safetensors"
    status, out, _ = run_cli(["encode", str(trained), "--dataset", "fashion-mnist", "--split", "test",
                              "--limit", "48", "--output", str(output), "--embeddings", "--no-progress"],
                             capsys)  # fmt: skip
    assert status == 0 and "Encoded 48 images" in out
    with safe_open(output, framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
        metadata = file.metadata()
    assert metadata["format"] == "mecoq-hf/encoded" and json.loads(metadata["data"])["split"] == "test"
    images = load_fashion_mnist("test", limit=48)
    model = MeCoQModel.from_pretrained(trained, dtype=torch.float32).eval()
    transform = build_eval_transform(model.backbone.data_config)
    pixels = torch.stack([transform(image) for image in images["image"]])
    with torch.no_grad():
        assert torch.equal(tensors["codes"], model.encode(pixels))
        torch.testing.assert_close(tensors["embeddings"], model.embed(pixels))
    assert tensors["codes"].dtype == torch.uint8 and tensors["codes"].shape == (48, 2)
    assert torch.equal(tensors["ids"], torch.arange(48))
    assert tensors["labels"].tolist() == images["label"]


# errors: one clear line, exit status 2


def _bad_runs(config_file: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    bad_suffix = tmp_path / "config.txt"
    bad_suffix.write_text("model: {}")
    train = ["train", "--config", str(config_file), "--output-dir", str(tmp_path / "out")]
    return {
        "missing dataset": (train + ["--dataset", str(tmp_path / "no_such_images")], "is not a folder"),
        "misspelt --set key": (train + ["--set", "model.temprature=0.3"], "Did you mean 'temperature'"),
        "unknown --set key": (train + ["--set", "flux=3"], "is not a model, training or data setting"),
        "unknown section": (train + ["--set", "optim.lr=3"], "unknown section 'optim'"),
        "wrong value type": (train + ["--set", "model.image_size=big"], "image_size"),
        "bits not whole bytes": (train + ["--bits", "12"], "not a multiple of log2(K) = 8"),
        "config file suffix": (["train", "--config", str(bad_suffix)], "must end in .json, .yaml or .yml"),
        "model folder without config": (["evaluate", str(empty)], "has no config.json"),
        "missing model folder": (
            [
                "encode",
                str(tmp_path / "nowhere"),
                "--dataset",
                "fashion-mnist",
                "--output",
                str(tmp_path / "c.safetensors"),
            ],
            "does not exist",
        ),
        "missing index": (
            ["search", str(tmp_path / "none.safetensors"), "--image", "x.png"],
            "does not exist",
        ),
    }


@pytest.mark.parametrize("case", ["missing dataset", "misspelt --set key", "unknown --set key",
                                  "unknown section", "wrong value type", "bits not whole bytes",
                                  "config file suffix", "model folder without config", "missing model folder",
                                  "missing index"])  # fmt: skip
def test_bad_input_prints_one_line_and_exits_2(case, config_file, tmp_path, capsys):
    argv, message = _bad_runs(config_file, tmp_path)[case]
    status, _, err = run_cli(argv, capsys)
    assert status == 2
    errors = [line for line in err.splitlines() if line.startswith("mecoq ")]
    assert len(errors) == 1 and ": error: " in errors[0], err
    assert message in errors[0]
    assert "Traceback" not in err


def test_errors_that_need_a_trained_model(trained, config_file, tmp_path, capsys):
    copy = tmp_path / "copied_model"  # a model folder without splits.json (e.g. downloaded)
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("splits.json", "checkpoints"))
    status, _, err = run_cli(["evaluate", str(copy)], capsys)
    assert status == 2 and "has no splits.json" in err and "--dataset" in err
    status, _, err = run_cli(["search", str(tmp_path / "x.safetensors"), "--model", str(trained), "--image",
                              str(tmp_path / "missing.png")], capsys)  # fmt: skip
    assert status == 2 and "does not exist" in err
    status, _, err = run_cli(["train", "--config", str(config_file), "--output-dir", str(trained)], capsys)
    assert status == 2 and "--resume" in err  # the folder already holds a run
    status, _, err = run_cli(["evaluate", str(trained), "--map-k", "0", "--no-progress"], capsys)
    assert status == 2 and "--map-k" in err
    (copy / "run_record.json").unlink()
    status, _, err = run_cli(["card", str(copy)], capsys)
    assert status == 2 and "has no run record" in err and "--metrics" in err
    with pytest.raises(SystemExit) as exited:  # --top-k is the number of search results, not K of mAP@K
        cli.main(["evaluate", str(trained), "--top-k", "10"])
    assert exited.value.code == 2


def test_debug_shows_the_exception_and_argparse_rejects_conflicting_flags(config_file, tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'temperature'"):
        cli.main(["--debug", "train", "--config", str(config_file), "--output-dir", str(tmp_path),
                  "--set", "model.temprature=0.3"])  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--bits", "16", "--num-codebooks", "2"])
    assert exited.value.code == 2


# the Hub (local test server)


def test_push_model_with_metrics_and_push_index(trained, tmp_path, local_hub, capsys):
    from huggingface_hub import HfApi, hf_hub_download

    metrics = tmp_path / "metrics.json"
    dataset = {"name": "fashion-mnist", "query_split": "query", "num_queries": 20, "num_database": 360}
    metrics.write_text(json.dumps({"metrics": {"map@100": 0.4321}, "dataset": dataset}))
    repo_id = "mecoq-tests/cli-model"
    status, out, _ = run_cli(
        ["push", str(trained), repo_id, "--metrics", str(metrics), "--token", "hf_cli"], capsys
    )
    assert status == 0 and repo_id in out
    files = set(HfApi().list_repo_files(repo_id))
    assert {"config.json", "model.safetensors", "codebooks.safetensors", "README.md"} <= files
    card = Path(hf_hub_download(repo_id, "README.md")).read_text()
    assert "0.4321" in card and "fashion-mnist" in card

    index = CodeIndex(torch.nn.functional.normalize(torch.randn(2, 256, 8), dim=-1))
    index.add_embeddings(torch.randn(30, 16))
    index_path = index.save(tmp_path / "index.safetensors")
    status, out, _ = run_cli(
        ["push-index", str(index_path), "mecoq-tests/cli-index", "--token", "hf_cli"], capsys
    )
    assert status == 0
    assert "index.safetensors" in HfApi().list_repo_files("mecoq-tests/cli-index", repo_type="dataset")


# examples and launchers (subprocesses)


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return env


def test_cifar10_example_explains_itself_and_fails_clearly_offline(tmp_path):
    script = str(ROOT / "examples" / "train_cifar10_vgg16.py")
    help_run = subprocess.run([sys.executable, script, "--help"], check=False, capture_output=True, text=True,
                              env=_subprocess_env(), timeout=300)  # fmt: skip
    assert help_run.returncode == 0 and "--vgg-weights" in help_run.stdout and "--protocol" in help_run.stdout
    offline = subprocess.run([sys.executable, script, "--output-dir", str(tmp_path)], check=False,
                             capture_output=True, text=True, env=_subprocess_env(), timeout=300)  # fmt: skip
    assert offline.returncode == 2
    assert "Hub is switched off" in offline.stderr and "--data DIR" in offline.stderr
    assert "--vgg-weights PATH" in offline.stderr and "Traceback" not in offline.stderr
    assert not any(tmp_path.iterdir())  # nothing was started


def _accelerate_train(config: str, output_dir: Path, config_file: Path, env: dict[str, str]) -> None:
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    command = [launcher, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / config), "-m",
               "mecoq_hf.cli", "train", "--config", str(config_file), "--output-dir", str(output_dir),
               "--no-progress"]  # fmt: skip
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Trained model saved to" in result.stdout


@pytest.mark.slow
def test_accelerate_launch_one_process(tmp_path, config_file):
    _accelerate_train("cpu_1.yaml", tmp_path / "run", config_file, _subprocess_env())
    record = json.loads((tmp_path / "run" / "run_record.json").read_text())
    assert record["num_processes"] == 1 and record["metrics"]["steps"] == 2  # 64 images / batch 32


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_synchronise(tmp_path, config_file):
    env = _subprocess_env()
    env.pop("ACCELERATE_USE_CPU", None)  # `training.build_accelerator` joins CPU processes over gloo itself
    _accelerate_train("cpu_2_processes.yaml", tmp_path / "run", config_file, env)
    record = json.loads((tmp_path / "run" / "run_record.json").read_text())
    assert record["num_processes"] == 2 and record["metrics"]["steps"] == 1  # 64 images / (2 x 32)
    assert json.loads((tmp_path / "run" / "splits.json").read_text())["sizes"]["train"] == 64


@pytest.mark.slow
def test_fashion_mnist_and_retrieval_examples_run(tmp_path, capsys):
    run = tmp_path / "fmnist"
    train = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_fashion_mnist.py"), "--output-dir", str(run),
         "--limit", "300", "--num-query", "20", "--num-validation", "20", "--train-size", "64",
         "--image-size", "32", "--epochs", "1", "--no-progress"],
        check=False, capture_output=True, text=True, env=_subprocess_env(), timeout=900,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-4000:]
    match = re.search(r"test mAP@1000 \(32 bits\): (0\.\d{4})", train.stdout)
    assert match, train.stdout
    status, out, _ = run_cli(["evaluate", str(run), "--map-k", "1000", "--no-progress"], capsys)
    assert status == 0 and re.search(rf"MeCoQ\s+{match.group(1)}", out)  # the example recorded its splits
    search = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "retrieval.py"), str(run), "--limit", "300", "--top-k", "3"],
        check=False, capture_output=True, text=True, env=_subprocess_env(), timeout=900,
    )  # fmt: skip
    assert search.returncode == 0, search.stderr[-4000:]
    ranked = re.findall(r"^\s+\d\. id\s+(\d+)\s+score\s+(-?\d+\.\d+)", search.stdout, re.MULTILINE)
    assert len(ranked) == 3 and all(0 <= int(item) < 300 for item, _ in ranked)
    scores = [float(score) for _, score in ranked]
    assert scores == sorted(scores, reverse=True)
    assert np.isfinite(scores).all()

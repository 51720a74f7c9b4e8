"""The model card (`mecoq_hf.model_card`): rendered from hand-written run records, then from a real run.

The hand-written records check each part of the card on its own. The real run is a tiny model trained by
`mecoq train` on Fashion-MNIST's test images (about 10 s on two CPU cores) and evaluated by `mecoq evaluate`
with and without the faiss PQ baseline; `mecoq card` renders its card from the run folder's records.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from tiny_runs import TINY_MODEL, tiny_run_config

from mecoq_hf import MeCoQConfig, cli
from mecoq_hf.model_card import MeCoQModelCardData, build_model_card

TINY_CONFIG = {**TINY_MODEL, "memory_size": 8}


# cards from hand-written run records

RUN_RECORD = {
    "config": {
        **TINY_CONFIG,
        "backbone": "tf_efficientnet_lite0",
        "backbone_weights": "pypi",
        "temperature": 0.3,
        "model_type": "mecoq",
        "transformers_version": "5.24.0",
    },
    "training_args": {
        "num_epochs": 5,
        "batch_size": 64,
        "learning_rate": 0.01,
        "output_dir": "runs/secret",
        "report_to": ["tensorboard"],
        "log_every_steps": 10,
    },
    "training_args_defaults": {"num_epochs": 50, "batch_size": 128, "learning_rate": 0.01},
    "training_args_plumbing": ["log_every_steps", "output_dir", "report_to"],
    "metrics": {"fashion_mnist_map@1000": 0.712345, "fashion_mnist_map@100": 0.8, "train_loss": 1.5},
    "dataset": {
        "name": "Fashion-MNIST",
        "id": "zalando-datasets/fashion_mnist",
        "train_split": "train",
        "num_train": 5000,
        "query_split": "test",
        "num_queries": 500,
        "num_database": 5000,
        "license": "MIT",
    },
    "versions": {"python": "3.11.9", "torch": "2.14.1", "transformers": "5.24.0"},
}


@pytest.fixture(scope="module")
def rendered_card() -> ModelCard:
    return build_model_card(copy.deepcopy(RUN_RECORD), repo_id="mecoq-tests/fmnist-32")


@pytest.mark.parametrize(
    "expected",
    [
        "Contrastive Quantization with Code Memory for Unsupervised Image Retrieval",
        "arXiv:2109.05205",
        "`tf_efficientnet_lite0` (timm)",
        "EfficientNet-Lite0 (Google's official TensorFlow release, Apache-2.0)",
        "| Code length | 8 bits per image |",  # M=2, K=16 -> 2 * 4 bits
        "M = 2 codebooks of K = 16 codewords, each of width D = 8",
        'MeCoQModel.from_pretrained("mecoq-tests/fmnist-32")',
        'AutoModel.from_pretrained("mecoq-tests/fmnist-32", trust_remote_code=True)',
        "model.embed(pixel_values)",
        "model.encode(pixel_values)",
        "Trained on 5000 images of **Fashion-MNIST** (`zalando-datasets/fashion_mnist`), split `train`.",
        "| `temperature` | `0.3` |",
        "| `num_codebooks` | `2` |",
        "| `num_epochs` | `5` |",
        "| MeCoQ (this model) | 8 bits (M=2 x K=16), asymmetric | Fashion-MNIST | test | mAP@1000 | 0.7123 |",
        "- Fashion-MNIST, test: 500 queries searched against 5000 database images.",
        "The weights in this repository are released under `apache-2.0`.",
        "- torch: 2.14.1",
        "@inproceedings{wang2022mecoq,",
    ],
)
def test_card_renders_the_expected_text(rendered_card, expected):
    assert expected in str(rendered_card)


@pytest.mark.parametrize(
    "absent",
    [
        "| `learning_rate` |",
        "| `codebook_size` | `256` |",
        "output_dir",
        "secret",
        "report_to",
        "log_every_steps",
        "train_loss",
        "More Information Needed",
        "None",
    ],
)
def test_card_omits_defaults_plumbing_and_filler(rendered_card, absent):
    # learning_rate equals its recorded default; plumbing arguments and non-mAP metrics never reach the card
    assert absent not in str(rendered_card)


def test_card_metadata_holds_the_model_index(rendered_card):
    data = rendered_card.data
    assert data.license == "apache-2.0"
    assert data.pipeline_tag == "image-feature-extraction"
    assert data.datasets == ["zalando-datasets/fashion_mnist"]
    assert "mecoq" in data.tags and "custom_code" in data.tags
    results = {result.metric_type: result for result in data.eval_results}
    assert set(results) == {"map@1000", "map@100"}
    result = results["map@1000"]
    assert result.metric_value == pytest.approx(0.7123)
    assert result.task_type == "image-feature-extraction"
    assert result.dataset_type == "zalando-datasets/fashion_mnist" and result.dataset_split == "test"
    assert result.metric_config == "8bits-M2-K16-asymmetric"
    assert result.dataset_args == {"num_queries": 500, "num_database": 5000}
    assert data.model_name == "fmnist-32"


def test_card_turns_unknown_facts_into_html_comments():
    card = str(build_model_card({}))
    for comment in [
        "<!-- The repo id was not known when this card was rendered",
        "<!-- The training data were not recorded in the run record",
        "<!-- The training arguments were not recorded in the run record. -->",
        "<!-- No evaluation results were recorded for this model. -->",
        "<!-- Library versions were not recorded in the run record. -->",
    ]:
        assert comment in card
    assert "No retrieval quality was recorded for this model" in card
    assert "model-index" not in card
    assert "None" not in card


def test_card_from_a_training_loop_run_record():
    # The shape `RunFolder.write_run_record` writes: validation mAP of the kept checkpoint, all arguments.
    config = MeCoQConfig(**TINY_CONFIG).to_dict()
    record = {
        "config": config,
        "training_args": {"output_dir": "runs/a", "num_epochs": 3, "batch_size": 32, "progress_bar": False},
        "training_args_defaults": {"num_epochs": 50, "batch_size": 128, "progress_bar": True},
        "training_args_plumbing": ["output_dir", "progress_bar"],
        "dataset": {"train_size": 600, "info": ""},
        "metrics": {
            "best_validation_map": 0.51234,
            "best_epoch": 2,
            "top_k": 100,
            "epochs_run": 3,
            "steps": 60,
        },
        "versions": {"torch": "2.14.1"},
    }
    card = build_model_card(record, repo_id="mecoq-tests/from-training")
    text = str(card)
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_split) == (
        "map@100",
        0.5123,
        "validation",
    )
    assert result.metric_name == "mAP@100 (8 bits, validation split used for model selection)"
    assert "Trained on 600 images. <!-- The dataset's name, licence and split were not recorded" in text
    assert (
        "| MeCoQ (this model) | 8 bits (M=2 x K=16), asymmetric | <!-- the evaluation dataset was not "
        "recorded --> | validation (model selection) | mAP@100 | 0.5123 |"
    ) in text
    assert "| `num_epochs` | `3` |" in text and "| `batch_size` | `32` |" in text
    assert "output_dir" not in text and "progress_bar" not in text
    assert "| `backbone` | `test_efficientnet` |" in text  # differs from the default backbone
    assert "transformers_version" not in text and "| `dtype`" not in text  # base config keys are not ours


def test_card_for_weights_of_unknown_origin_asks_for_the_licence():
    card = build_model_card({"config": {"backbone": "vgg16", "backbone_weights": "/data/vgg16.pth"}})
    text = str(card)
    assert card.data.license is None
    assert "<!-- The licence of these weights is unknown" in text
    assert "A local weights file (`vgg16.pth`). <!-- Origin and licence" in text
    assert "numbers from this model are not directly comparable" not in text  # it is the paper's backbone


def test_card_reads_a_run_record_file_and_applies_overrides(tmp_path):
    path = tmp_path / "run_record.json"
    path.write_text(json.dumps(RUN_RECORD))
    card = build_model_card(path, repo_id="mecoq-tests/x", license="mit", tags=["mecoq", "custom"])
    assert card.data.license == "mit" and card.data.tags == ["mecoq", "custom"]
    with pytest.raises(ValueError, match="Unknown model card field 'licence'"):
        build_model_card(path, licence="mit")
    with pytest.raises(TypeError, match="run_record must be a dict"):
        MeCoQModelCardData.from_run_record(["not", "a", "dict"])


def test_card_puts_each_baseline_next_to_the_model_and_keeps_it_out_of_the_model_index():
    record = {
        "config": TINY_CONFIG,
        "metrics": {"best_validation_map": 0.4, "top_k": 100, "map@100": 0.6},
        "dataset": {"name": "fashion-mnist", "split_sizes": {"validation": 50, "database": 900}},
        "eval_datasets": {"": {"name": "fashion-mnist", "query_split": "query", "num_queries": 100,
                               "num_database": 900, "relevance": "same class"}},
        "baselines": {"faiss PQ": {"map@100": 0.512345, "bits": 16, "method": "faiss IndexPQ(M=2, 8 bits)",
                                   "num_train": 300}},
    }  # fmt: skip
    card = build_model_card(record)
    rows = [
        line for line in str(card).splitlines() if line.startswith("| MeCoQ") or line.startswith("| faiss")
    ]
    assert rows == [
        "| MeCoQ (this model) | 8 bits (M=2 x K=16), asymmetric | fashion-mnist | query | mAP@100 | 0.6 |",
        "| faiss PQ | 16 bits | fashion-mnist | query | mAP@100 | 0.5123 |",
        "| MeCoQ (this model) | 8 bits (M=2 x K=16), asymmetric | fashion-mnist "
        "| validation (model selection) | mAP@100 | 0.4 |",
    ]
    assert "- faiss PQ: faiss IndexPQ(M=2, 8 bits), fitted on 300 training images." in str(card)
    assert [result.metric_value for result in card.data.eval_results] == [0.6, 0.4]  # no baseline value
    validation = card.data.eval_results[1]
    assert validation.dataset_args == {"num_queries": 50, "num_database": 900, "relevance": "same class"}
    assert "the baselines' are not" in str(card)


# the card of a real run, through the command line

RUN_CONFIG = tiny_run_config(split="test")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A model folder written by `mecoq train` on the first 400 Fashion-MNIST test images."""
    warnings.simplefilter("ignore")
    root = tmp_path_factory.mktemp("card_run")
    (root / "run.yaml").write_text(RUN_CONFIG)
    argv = ["train", "--config", str(root / "run.yaml"), "--output-dir", str(root / "model"), "--no-progress"]
    assert cli.main(argv) == 0
    return root / "model"


def render_card(run_folder: Path, tmp_path: Path, capsys, *evaluate_flags: str) -> tuple[ModelCard, dict]:
    """`mecoq evaluate` (with `evaluate_flags`), then `mecoq card --metrics`: (the card, metrics.json)."""
    metrics, card_path = tmp_path / "metrics.json", tmp_path / "README.md"
    argv = ["evaluate", str(run_folder), "--map-k", "50", "--output", str(metrics), "--no-progress"]
    assert cli.main([*argv, *evaluate_flags]) == 0
    assert cli.main(["card", str(run_folder), "--metrics", str(metrics), "--output", str(card_path)]) == 0
    capsys.readouterr()
    return ModelCard.load(card_path), json.loads(metrics.read_text())


def table_rows(card: ModelCard) -> list[list[str]]:
    """The cells of the results table's rows (after its header)."""
    lines = card.text.split("| Method | Code | Dataset | Query split | Metric | Value |")[1].splitlines()
    return [
        [cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:] if line.startswith("|")
    ]


@pytest.mark.slow
def test_card_of_a_run_names_the_data_it_was_trained_on(run_folder, tmp_path, capsys):
    card, metrics = render_card(run_folder, tmp_path, capsys)
    sizes = json.loads((run_folder / "splits.json").read_text())["sizes"]
    assert sizes == {"query": 20, "validation": 20, "database": 360, "train": 64}
    assert "Trained on 64 images of **fashion-mnist**, split `test` (its first 400 images)." in card.text
    assert (
        "These are the train split of this run: fashion-mnist: random splits (seed 0): 20 query, "
        "20 validation, 360 database, 64 train (the train images are drawn from the database)."
    ) in card.text
    assert "split `train`" not in card.text
    test, validation = card.data.eval_results
    assert (test.dataset_split, test.dataset_args["num_queries"], test.dataset_args["num_database"]) == (
        "query",
        20,
        360,
    )
    assert (validation.dataset_split, validation.dataset_args["num_queries"]) == (
        "validation",
        sizes["validation"],
    )
    # Without a baseline in metrics.json: one row per result of the model, no baseline.
    assert "baselines" not in metrics and "faiss PQ" not in card.text
    assert [row[0] for row in table_rows(card)] == ["MeCoQ (this model)", "MeCoQ (this model)"]
    assert table_rows(card)[0][1:] == [
        "16 bits (M=2 x K=256), asymmetric",
        "fashion-mnist",
        "query",
        "mAP@50",
        str(round(metrics["metrics"]["map@50"], 4)),
    ]


@pytest.mark.slow
def test_card_of_a_run_compares_with_the_pq_baseline_of_metrics_json(run_folder, tmp_path, capsys):
    card, metrics = render_card(run_folder, tmp_path, capsys, "--baseline", "pq", "--train-size", "256")
    pq = metrics["baselines"]["pq"]
    assert pq["bits"] == 16 and pq["num_train"] == 256
    rows = table_rows(card)
    assert [row[0] for row in rows] == ["MeCoQ (this model)", "faiss PQ", "MeCoQ (this model)"]
    assert rows[0][1:] == ["16 bits (M=2 x K=256), asymmetric", "fashion-mnist", "query", "mAP@50",
                           str(round(metrics["metrics"]["map@50"], 4))]  # fmt: skip
    assert rows[1][1:] == ["16 bits", "fashion-mnist", "query", "mAP@50", str(round(pq["map@50"], 4))]
    assert rows[2][3] == "validation (model selection)"
    assert f"- faiss PQ: {pq['method']}, fitted on 256 training images." in card.text
    # the model-index reports this model only
    values = [result.metric_value for result in card.data.eval_results]
    assert round(pq["map@50"], 4) not in values and round(metrics["metrics"]["map@50"], 4) in values
    # the training data are still the recorded run's (64 images), not the evaluation's 256-image train split
    assert "Trained on 64 images of **fashion-mnist**, split `test`" in card.text
    assert re.search(r"- fashion-mnist, query: 20 queries searched against 360 database images", card.text)

"""`RunFolder`: the records of a training run (splits, arguments, log, run record, metrics) on real data."""

from __future__ import annotations

import json

import pytest

from mecoq_hf import MeCoQConfig
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.data.splits import SplitDefinition
from mecoq_hf.training import EvaluationReport, RunFolder, TrainingArguments
from mecoq_hf.training.checkpoints import TrainerState

DEFINITION = SplitDefinition(source="fashion-mnist", limit=100, num_query=10, num_validation=10, seed=0)


@pytest.fixture
def run(tmp_path) -> RunFolder:
    return RunFolder(tmp_path / "run")


def test_splits_are_recorded_and_a_finished_run_is_not_overwritten(run):
    splits = run.record_splits(DEFINITION)
    definition, record = run.recorded_splits()
    assert definition == DEFINITION and record["sizes"]["train"] == 80
    assert record["description"] == DEFINITION.describe(splits)
    (run.path / "checkpoints" / "step_8").mkdir(parents=True)  # the folder now holds a run
    with pytest.raises(ValueError, match=r"already holds a training run.*--resume"):
        run.record_splits(DEFINITION)
    assert run.record_splits(DEFINITION, resume=True)["train"]["index"] == splits["train"]["index"]
    with pytest.raises(ValueError, match="query split built from 'fashion-mnist' differs.*first run"):
        run.record_splits(SplitDefinition(**{**record["definition"], "seed": 1}), resume=True)


def test_evaluation_rebuilds_the_recorded_splits_and_checks_them(run):
    recorded = run.record_splits(DEFINITION)
    definition, splits = run.evaluation_splits()
    assert definition == DEFINITION and splits["query"]["index"] == recorded["query"]["index"]
    definition, splits = run.evaluation_splits({"num_train": 20})  # new split options: on purpose, unchecked
    assert definition.num_train == 20 and len(splits["train"]) == 20 and definition.seed == 0
    record = json.loads((run.path / "splits.json").read_text())
    record["fingerprints"]["database"] = "0" * 64  # the data changed since training
    (run.path / "splits.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="database split .* differs.*Restore the recorded data"):
        run.evaluation_splits()


def test_a_folder_without_splits_needs_a_source(tmp_path):
    folder = RunFolder(tmp_path / "downloaded")
    with pytest.raises(ValueError, match=r"has no splits.json .*--dataset SOURCE"):
        folder.evaluation_splits()
    definition, splits = folder.evaluation_splits({"source": "fashion-mnist", "limit": 50, "num_query": 5})
    assert definition.num_validation == 0 and len(splits["validation"]) == 0 and len(splits["query"]) == 5


def test_training_arguments_log_and_the_map_k(run):
    assert run.map_k() == TrainingArguments(output_dir="x").top_k  # nothing recorded: the default K
    args = TrainingArguments(output_dir=str(run.path), top_k=50)
    run.write_training_args(args)
    assert run.recorded_training_args() == args.to_dict() and run.map_k() == 50
    run.append_log("step", {"step": 1, "loss": 2.5})
    run.append_log("epoch", {"epoch": 0})
    assert run.read_log() == [{"event": "step", "step": 1, "loss": 2.5}, {"event": "epoch", "epoch": 0}]


def test_a_run_record_names_only_data_it_really_trained_on(run):
    run.record_splits(DEFINITION)
    other_images = load_fashion_mnist("test", limit=30)  # not the recorded train split
    config = MeCoQConfig(
        backbone="test_efficientnet", backbone_weights=None, embedding_dim=16, num_codebooks=2
    )
    args = TrainingArguments(output_dir=str(run.path), num_epochs=3)
    state = TrainerState(epoch=3, global_step=12, best_metric=0.25, best_epoch=1)
    run.write_run_record(config, args, state, other_images, num_processes=1, finished=True)
    record = run.read_run_record()
    assert record["dataset"] == {"train_size": 30, "info": ""}
    assert record["metrics"] == {"best_validation_map": 0.25, "best_epoch": 1, "top_k": 1000, "epochs_run": 3,
                                 "steps": 12}  # fmt: skip
    assert record["training_args_defaults"]["num_epochs"] == 50 and record["finished"] is True
    assert record["config"]["backbone"] == "test_efficientnet" and "torch" in record["versions"]


def test_metrics_round_trip_and_merge_into_the_card_record(run, tmp_path):
    report = EvaluationReport(
        metrics={"map@100": 0.5}, top_k=100, distance="asymmetric", bits=16, model="m",
        dataset={"name": "fashion-mnist", "num_queries": 10},
        baselines={"pq": {"map@100": 0.25, "num_train": 256}},
    )  # fmt: skip
    path = run.write_metrics(report)
    assert (
        path == run.path / "metrics.json"
        and json.loads(path.read_text())["baselines"]["pq"]["num_train"] == 256
    )
    assert run.read_metrics() == report and report.scores() == {"MeCoQ": 0.5, "faiss PQ": 0.25}

    assert run.card_record() is None  # neither a run record nor metrics
    (run.path / "config.json").write_text(json.dumps({"num_codebooks": 2}))
    card = run.card_record(path)
    assert card == {"config": {"num_codebooks": 2}, "metrics": {"map@100": 0.5},
                    "eval_datasets": {"": report.dataset},
                    "baselines": {"faiss PQ": {"map@100": 0.25, "num_train": 256}}}  # fmt: skip
    (run.path / "run_record.json").write_text(json.dumps({"metrics": {"best_validation_map": 0.4}}))
    assert run.card_record(path)["metrics"] == {"best_validation_map": 0.4, "map@100": 0.5}

    (tmp_path / "bad.json").write_text(json.dumps({"map@100": 0.5}))
    with pytest.raises(TypeError, match="is not a `mecoq evaluate --output` file"):
        run.read_metrics(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="mecoq evaluate --output"):
        run.read_metrics(tmp_path / "missing.json")

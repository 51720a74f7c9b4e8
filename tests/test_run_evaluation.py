"""`evaluate_run`: the final test of a model on its splits, as `mecoq evaluate` reports it."""

from __future__ import annotations

import warnings

import pytest

from mecoq_hf import MeCoQConfig, MeCoQModel
from mecoq_hf.data.splits import SplitDefinition
from mecoq_hf.retrieval.evaluation import evaluate_model
from mecoq_hf.training import evaluate_run

DEFINITION = SplitDefinition(source="fashion-mnist", limit=100, num_query=10, num_validation=10, seed=0)


@pytest.fixture(scope="module")
def model_and_splits():
    warnings.simplefilter("ignore")
    config = MeCoQConfig(backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=16,
                         num_codebooks=2, codebook_size=16)  # fmt: skip
    return MeCoQModel(config).eval(), DEFINITION.build()


def test_the_report_holds_the_models_map_and_the_data(model_and_splits):
    model, splits = model_and_splits
    report = evaluate_run(model, DEFINITION, splits, top_k=1000, pr_curve=True, show_progress_bar=False,
                          model_name="tiny")  # fmt: skip
    expected = evaluate_model(model, splits["query"], splits["database"], top_k=80, show_progress_bar=False)
    assert report.top_k == 80  # K is at most the database size
    assert report.metrics == {"map@80": expected.map_at_k} and report.scores() == {"MeCoQ": expected.map_at_k}
    assert (report.model, report.distance, report.bits) == ("tiny", "asymmetric", 8)
    assert report.dataset["num_queries"] == 10 and report.dataset["num_database"] == 80
    assert report.dataset["relevance"] == "same class" and report.dataset["protocol"] == DEFINITION.describe(
        splits
    )
    assert list(report.curves) == ["MeCoQ (8 bits)"] and "curves" not in report.to_dict()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_k": 0}, r"K of mAP@K must be >= 1, got 0 \(mecoq evaluate --map-k K\)"),
        ({"top_k": 10, "baseline": "lsh"}, "baseline must be one of"),
        ({"top_k": 10, "baseline": "pq"}, "needs >= 256 training images, got 80.*--train-size"),
    ],
)
def test_bad_requests_are_refused_before_any_work(model_and_splits, options, message):
    model, splits = model_and_splits
    with pytest.raises(ValueError, match=message):
        evaluate_run(model, DEFINITION, splits, **options)

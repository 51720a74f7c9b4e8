"""Tests of evaluation.py: scores from codes, `retrieval_result`, the evaluator (training, evaluate_model)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from retrieval_references import reference_map

from mecoq_hf import MeCoQConfig, MeCoQModel
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.data.transforms import build_eval_transform
from mecoq_hf.models.mecoq.quantization import ProductQuantizer, decode_codes
from mecoq_hf.retrieval.evaluation import (
    CodeScores,
    RetrievalEvaluator,
    evaluate_codes,
    evaluate_model,
    retrieval_result,
)
from mecoq_hf.retrieval.metrics import precision_recall_curve
from mecoq_hf.retrieval.scoring import SearchSettings
from mecoq_hf.training.validation import ValidationSet

RAW = SearchSettings("asymmetric", normalize_query_subvectors=False)
UNIT = SearchSettings("asymmetric", normalize_query_subvectors=True)


# scores from codes


@pytest.fixture(scope="module")
def code_case():
    torch.manual_seed(0)
    quantizer = ProductQuantizer(dim=32, num_codebooks=4, codebook_size=16)
    database = torch.randn(300, 32)
    return (
        quantizer.normalized_codebooks().detach(),
        quantizer.encode(database),
        torch.randn(20, 32),
        quantizer,
    )


def test_asymmetric_scores_equal_decode_and_dot(code_case):
    codebooks, codes, queries, _ = code_case
    decoded = decode_codes(codes, codebooks)  # (N, d)
    scores = CodeScores(queries, codes, codebooks, RAW).to_tensor()
    torch.testing.assert_close(scores, queries @ decoded.T, atol=1e-5, rtol=1e-5)
    normalized = F.normalize(queries.reshape(20, 4, 8), dim=-1).reshape(20, 32)
    scores = CodeScores(queries, codes, codebooks, UNIT)[0:20]
    torch.testing.assert_close(scores, normalized @ decoded.T, atol=1e-5, rtol=1e-5)


def test_code_scores_default_to_the_config_defaults(code_case):
    codebooks, codes, queries, _ = code_case
    default = CodeScores(queries, codes, codebooks)
    assert default.settings == SearchSettings.from_config(MeCoQConfig())
    expected = CodeScores(queries, codes, codebooks, SearchSettings.from_config(MeCoQConfig()))
    assert torch.equal(default.to_tensor(), expected.to_tensor())


def test_symmetric_scores_use_hard_coded_queries(code_case):
    codebooks, codes, queries, quantizer = code_case
    expected = decode_codes(quantizer.encode(queries), codebooks) @ decode_codes(codes, codebooks).T
    scores = CodeScores(queries, codes, codebooks, SearchSettings("symmetric")).to_tensor()
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("distance", ["asymmetric", "symmetric"])
def test_evaluate_codes_equals_map_of_full_scores(code_case, distance):
    codebooks, codes, queries, _ = code_case
    query_labels, db_labels = torch.arange(20) % 3, torch.arange(300) % 3
    settings = SearchSettings(distance)
    full = CodeScores(queries, codes, codebooks, settings).to_tensor()
    for top_k in (None, 50):
        expected = reference_map(full, query_labels, db_labels, top_k)
        got = evaluate_codes(
            queries, codes, codebooks, query_labels, db_labels, top_k, settings=settings, chunk_size=3
        )
        assert got == pytest.approx(expected, abs=1e-12)


def test_code_scores_reject_a_wrong_query_width(code_case):
    codebooks, codes, queries, _ = code_case
    with pytest.raises(ValueError, match=r"shape \(Q, 32\)"):
        CodeScores(queries[:, :16], codes, codebooks)


def test_retrieval_result_holds_map_and_the_pr_curve(code_case):
    codebooks, codes, queries, _ = code_case
    scores, labels = CodeScores(queries, codes, codebooks), (torch.arange(20) % 3, torch.arange(300) % 3)
    result = retrieval_result(scores, *labels, top_k=40, pr_curve=True, details={"method": "x"})
    assert result.map_at_k == pytest.approx(reference_map(scores.to_tensor(), *labels, 40), abs=1e-12)
    precision, recall = precision_recall_curve(scores, *labels)
    assert torch.equal(result.pr_curve[0], precision) and torch.equal(result.pr_curve[1], recall)
    assert result.details == {"method": "x"} and retrieval_result(scores, *labels, top_k=5).pr_curve is None


# a real MeCoQModel on normal-form Fashion-MNIST splits


def spread_model(**overrides) -> MeCoQModel:
    """A MeCoQModel with timm's tiny test_efficientnet backbone (random weights) at 32 px, in eval mode, whose
    projection is centred on Fashion-MNIST features so that its codes differ between images."""
    torch.manual_seed(0)
    config = MeCoQConfig(backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=16,
                         num_codebooks=2, codebook_size=16, **overrides)  # fmt: skip
    model = MeCoQModel(config).eval()
    with torch.no_grad():
        features = model.backbone(eval_pixels(model, load_fashion_mnist("train", limit=64)))
        model.projection.weight.mul_(30)
        model.projection.bias.sub_(model.projection(features.mean(dim=0)))
    return model


def eval_pixels(model: MeCoQModel, images) -> torch.Tensor:
    transform = build_eval_transform(model.backbone.data_config)
    return torch.stack([transform(image) for image in images["image"]])  # (N, 3, 32, 32)


@pytest.fixture(scope="module")
def splits():
    images = load_fashion_mnist("test", limit=80)
    return images.select(range(16)), images.select(range(16, 80))


@pytest.fixture(scope="module")
def tiny_mecoq() -> MeCoQModel:
    return spread_model()


def reference_model_map(model, queries, database, top_k, distance=None):
    """mAP@top_k from `model.embed` / `model.encode` on the images, scored by brute force."""
    with torch.no_grad():
        embeddings, codes = (
            model.embed(eval_pixels(model, queries)),
            model.encode(eval_pixels(model, database)),
        )
    settings = SearchSettings.from_config(model.config, distance=distance)
    scores = CodeScores(embeddings, codes, model.normalized_codebooks(), settings).to_tensor()
    labels = torch.tensor(queries["label"][:]), torch.tensor(database["label"][:])
    return reference_map(scores, *labels, top_k), scores, labels


@pytest.mark.parametrize("normalize", [False, True])
def test_evaluate_model_on_labelled_image_splits(splits, normalize):
    model, (queries, database) = spread_model(normalize_query_subvectors=normalize), splits
    result = evaluate_model(model, queries, database, top_k=20, batch_size=16, pr_curve=True,
                            show_progress_bar=False)  # fmt: skip
    expected, scores, labels = reference_model_map(model, queries, database, 20)
    assert result.map_at_k == pytest.approx(expected, abs=1e-9) and 0.2 < expected < 1.0  # chance is ~0.1
    precision, recall = precision_recall_curve(scores, *labels)
    assert torch.equal(result.pr_curve[0], precision) and torch.equal(result.pr_curve[1], recall)
    assert precision.shape == (64,) and result.details == {}
    symmetric = evaluate_model(
        model, queries, database, top_k=20, distance="symmetric", show_progress_bar=False
    )
    assert symmetric.pr_curve is None
    assert symmetric.map_at_k == pytest.approx(
        reference_model_map(model, queries, database, 20, "symmetric")[0]
    )
    with pytest.raises(ValueError, match="The database split has no labels"):
        evaluate_model(model, queries, database.remove_columns("label"), top_k=20)


def test_retrieval_evaluator_contract(tiny_mecoq, splits, tmp_path):
    evaluator = RetrievalEvaluator(
        *splits, top_k=30, name="fashion-mnist", batch_size=16, show_progress_bar=False
    )
    tiny_mecoq.train()
    try:
        metrics = evaluator(tiny_mecoq, output_path=tmp_path, epoch=2, steps=10)
        assert tiny_mecoq.training  # mode restored
    finally:
        tiny_mecoq.eval()
    assert evaluator.primary_metric == "fashion-mnist_map@30" and evaluator.greater_is_better
    expected = reference_model_map(tiny_mecoq, *splits, 30)[0]
    assert metrics == {"fashion-mnist_map@30": pytest.approx(expected, abs=1e-12)}
    evaluator(tiny_mecoq, output_path=tmp_path, epoch=3, steps=20)
    records = json.loads((tmp_path / "fashion-mnist_evaluation_results.json").read_text())
    assert [(r["epoch"], r["steps"]) for r in records] == [(2, 10), (3, 20)]
    assert RetrievalEvaluator(*splits, top_k=None).primary_metric == "map@all"


def test_kept_features_skip_the_backbone(splits):
    model = spread_model()
    evaluator = RetrievalEvaluator(*splits, top_k=30, show_progress_bar=False)
    evaluator.keep_features(model.backbone)
    before = evaluator.evaluate(model).map_at_k
    with torch.no_grad():  # a frozen backbone never changes; if it did, kept features would not see it
        model.backbone.model.conv_stem.weight.mul_(-1.0)
    assert evaluator.evaluate(model).map_at_k == before
    fresh = RetrievalEvaluator(*splits, top_k=30, show_progress_bar=False).evaluate(model).map_at_k
    assert fresh == pytest.approx(reference_model_map(model, *splits, 30)[0], abs=1e-12) and fresh != before


def test_validation_set_scores_the_trained_model_as_evaluate_model(tiny_mecoq, splits, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator = Accelerator(cpu=True)
        validation = ValidationSet(*splits, top_k=25, batch_size=16)
        expected = evaluate_model(tiny_mecoq, *splits, top_k=25, show_progress_bar=False).map_at_k
        assert validation.mean_average_precision(accelerator.prepare(tiny_mecoq), accelerator) == expected
        validation.cache_features(tiny_mecoq, accelerator, tmp_path)
        assert len(list(tmp_path.glob("features-*.safetensors"))) == 2  # query and database, on disk
        assert validation.mean_average_precision(tiny_mecoq, accelerator) == expected
    finally:  # leave no process-wide accelerate state behind for other tests
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

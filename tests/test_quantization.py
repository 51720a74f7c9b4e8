"""Product quantizer: soft/hard assignment, encode/decode, code helpers and codebook files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mecoq_hf.models.mecoq.quantization import ProductQuantizer, code_dtype, load_codebooks, save_codebooks


@pytest.fixture
def quantizer() -> ProductQuantizer:
    torch.manual_seed(0)
    return ProductQuantizer(dim=12, num_codebooks=3, codebook_size=8, softmax_scale=10.0)


def test_soft_quantization_matches_definition(quantizer):
    z = torch.randn(5, 12)
    soft = quantizer(z)
    codebooks = F.normalize(quantizer.codebooks, dim=-1)
    for b in range(5):
        for m in range(3):
            sub = F.normalize(z[b, 4 * m : 4 * m + 4], dim=0)
            probabilities = torch.softmax(10.0 * codebooks[m] @ sub, dim=0)
            assert torch.allclose(soft.assignments[b, m], probabilities, atol=1e-6)
            assert torch.allclose(
                soft.reconstruction[b, 4 * m : 4 * m + 4], probabilities @ codebooks[m], atol=1e-6
            )
            assert soft.codes[b, m] == int(torch.argmax(codebooks[m] @ sub))
    # Each soft sub-vector is a convex combination of unit vectors: norm <= 1.
    assert (soft.reconstruction.reshape(5, 3, 4).norm(dim=-1) <= 1 + 1e-6).all()


def test_encode_decode_equals_hard_quantization(quantizer):
    z = torch.randn(7, 12)
    codes = quantizer.encode(z)
    assert codes.dtype == torch.uint8 and codes.shape == (7, 3)
    assert torch.equal(codes, quantizer(z).codes)
    decoded = quantizer.decode(codes)
    codebooks = quantizer.normalized_codebooks()
    expected = torch.cat([codebooks[m, codes[:, m].long()] for m in range(3)], dim=1)
    assert torch.equal(decoded, expected)
    # Hard code of a decoded vector is the same code (codewords are their own nearest neighbours).
    assert torch.equal(quantizer.encode(decoded), codes)
    # With a very large softmax scale the soft reconstruction converges to the hard one.
    sharp = ProductQuantizer(12, 3, 8, softmax_scale=1e4)
    sharp.load_state_dict(quantizer.state_dict())
    assert torch.allclose(sharp(z).reconstruction, decoded, atol=1e-4)


def test_codes_are_scale_invariant_per_subvector(quantizer):
    z = torch.randn(4, 12)
    scaled = z.reshape(4, 3, 4) * torch.tensor([0.1, 5.0, 30.0])[None, :, None]
    assert torch.equal(quantizer.encode(scaled.reshape(4, 12)), quantizer.encode(z))


def test_code_dtype_widens_with_codebook_size():
    assert code_dtype(256) == torch.uint8
    assert code_dtype(257) == torch.int16
    assert code_dtype(2**16) == torch.int32
    big = ProductQuantizer(dim=8, num_codebooks=2, codebook_size=300)
    assert big.encode(torch.randn(3, 8)).dtype == torch.int16


def test_trainable_flag_controls_gradient():
    frozen = ProductQuantizer(8, 2, 4, trainable=False)
    frozen(torch.randn(3, 8, requires_grad=True)).reconstruction.sum().backward()
    assert frozen.codebooks.grad is None
    trainable = ProductQuantizer(8, 2, 4, trainable=True)
    trainable(torch.randn(3, 8)).reconstruction.sum().backward()
    assert trainable.codebooks.grad is not None and trainable.codebooks.grad.abs().sum() > 0


def test_bad_shapes_give_clear_errors(quantizer):
    with pytest.raises(ValueError, match="not divisible"):
        quantizer(torch.randn(2, 10))
    with pytest.raises(ValueError, match="multiple of num_codebooks"):
        ProductQuantizer(dim=10, num_codebooks=3)
    with pytest.raises(ValueError, match=r"lie in \[0, 7\]"):
        quantizer.decode(torch.tensor([[0, 1, 9]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="M=3"):
        quantizer.decode(torch.zeros(2, 2, dtype=torch.uint8))


def test_codebook_file_round_trip_and_corruption(tmp_path, quantizer):
    path = tmp_path / "codebooks.safetensors"
    save_codebooks(path, quantizer.normalized_codebooks())
    loaded = load_codebooks(path)
    assert torch.equal(loaded, quantizer.normalized_codebooks())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_codebooks(path)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"codebooks": torch.zeros(2, 4, 3)}, other, metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a valid MeCoQ codebooks file"):
        load_codebooks(other)


def test_hard_codes_function_equals_the_quantizer(quantizer):
    from mecoq_hf.models.mecoq.quantization import hard_codes

    z = torch.randn(9, 12)
    assert torch.equal(hard_codes(z, quantizer.codebooks.detach()), quantizer.encode(z))
    with pytest.raises(ValueError, match=r"\(B, 12\)"):
        hard_codes(torch.randn(2, 8), quantizer.codebooks.detach())


# unit-norm codewords, precision, gradients


def test_codewords_are_unit_norm_and_renormalisation_only_rescales(quantizer):
    norms = quantizer.codebooks.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)
    z = torch.randn(6, 12)
    with torch.no_grad():
        quantizer.codebooks.mul_(torch.rand(3, 8, 1) + 0.05)  # e.g. after an optimizer step
    directions, codes = quantizer.normalized_codebooks().detach(), quantizer.encode(z)
    quantizer.renormalize_codebooks_()
    torch.testing.assert_close(quantizer.codebooks.detach(), directions, rtol=0, atol=1e-7)
    assert torch.equal(quantizer.encode(z), codes)


def test_quantizer_ignores_bf16_autocast(quantizer):
    z = torch.randn(32, 12)
    reference = quantizer(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, codes = quantizer(z), quantizer.encode(z)  # lookup tables: test_scoring.py
    assert mixed.reconstruction.dtype == mixed.assignments.dtype == torch.float32
    assert torch.equal(mixed.assignments, reference.assignments)
    assert torch.equal(mixed.reconstruction, reference.reconstruction)
    assert torch.equal(codes, reference.codes) and torch.equal(mixed.codes, reference.codes)


def test_soft_quantization_gradients_match_finite_differences():
    """float64 gradcheck of the reconstruction and the assignments w.r.t. embeddings and raw codebooks."""
    torch.manual_seed(7)
    quantizer = ProductQuantizer(dim=6, num_codebooks=2, codebook_size=4, trainable=True).double()
    embeddings = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    codebooks = (quantizer.codebooks.detach() * 1.3).requires_grad_()  # off the unit sphere on purpose

    def soft(z: torch.Tensor, raw_codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = torch.func.functional_call(quantizer, {"codebooks": raw_codebooks}, (z,))
        return output.reconstruction, output.assignments

    assert torch.autograd.gradcheck(soft, (embeddings, codebooks))


# spherical k-means initialisation


def test_kmeans_initialisation_recovers_known_clusters():
    """8 well-separated unit centres per sub-space (+-e_i in R^4), 30 noisy points each, shuffled."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.cat([torch.eye(4), -torch.eye(4)])  # (8, 4)
    true = torch.stack([centres, centres[torch.randperm(8, generator=generator)]])  # (M=2, 8, 4)
    labels = torch.randint(0, 8, (240, 2), generator=generator)  # (N, M)
    points = true[torch.arange(2), labels] + 0.05 * torch.randn(240, 2, 4, generator=generator)  # (N, M, 4)
    quantizer = ProductQuantizer(dim=8, num_codebooks=2, codebook_size=8)
    quantizer.init_codebooks_from_embeddings_(points.reshape(240, 8) * 7.0, seed=3)  # scale is irrelevant

    codebooks = quantizer.codebooks.detach()
    norms = codebooks.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)
    for m in range(2):
        match = (codebooks[m] @ true[m].T).max(dim=1)  # nearest true centre of every codeword
        assert (match.values > 0.99).all()
        assert sorted(match.indices.tolist()) == list(range(8))  # one codeword per cluster
    again = ProductQuantizer(dim=8, num_codebooks=2, codebook_size=8)
    again.init_codebooks_from_embeddings_(points.reshape(240, 8) * 7.0, seed=3)
    assert torch.equal(again.codebooks, quantizer.codebooks)  # seeded and deterministic
    again.init_codebooks_from_embeddings_(points.reshape(240, 8), seed=3)
    torch.testing.assert_close(again.codebooks, quantizer.codebooks, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="at least K=8"):
        again.init_codebooks_from_embeddings_(torch.randn(7, 8))
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        again.init_codebooks_from_embeddings_(torch.randn(20, 6))


def test_kmeans_initialisation_fits_projected_fashion_mnist_better_than_random():
    """Embeddings of 400 real Fashion-MNIST images (tiny random backbone, 32 px): after k-means every
    codeword serves some images and sub-vectors lie closer to their codewords than with random ones."""
    import warnings

    from real_data import require_fashion_mnist

    from mecoq_hf import MeCoQConfig, MeCoQModel
    from mecoq_hf.data.sources import load_fashion_mnist
    from mecoq_hf.data.transforms import build_eval_transform

    require_fashion_mnist()
    torch.manual_seed(0)
    config = MeCoQConfig(
        backbone="test_efficientnet",
        backbone_weights=None,
        image_size=32,
        embedding_dim=16,
        num_codebooks=2,
        codebook_size=16,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MeCoQModel(config).eval()
    transform = build_eval_transform(model.backbone.data_config, image_size=32)
    images = torch.stack([transform(row["image"]) for row in load_fashion_mnist("train", limit=400)])
    with torch.no_grad():
        embeddings = model.embed(images)  # (400, 16)
    subvectors = F.normalize(embeddings.reshape(400, 2, 8), dim=-1)  # (N, M, D)

    def fit(codebooks: torch.Tensor) -> tuple[float, int]:
        cosines = torch.einsum("nmd,mkd->nmk", subvectors, codebooks)  # (N, M, K)
        best = cosines.max(dim=-1)
        used = min(len(best.indices[:, m].unique()) for m in range(2))
        return best.values.mean().item(), used

    random_fit, random_used = fit(model.normalized_codebooks().detach())
    model.quantizer.init_codebooks_from_embeddings_(embeddings, seed=0)
    kmeans_fit, kmeans_used = fit(model.normalized_codebooks().detach())
    assert kmeans_used == 16 and kmeans_used > random_used
    assert kmeans_fit > random_fit + 0.05

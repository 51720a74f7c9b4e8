"""Tests of sidecar.py and image_index.py: what an index's ids stand for, and indexes of image datasets built
from a saved model and searched with an image (the library side of `mecoq index build` / `mecoq search`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mecoq_hf import MeCoQConfig, MeCoQModel
from mecoq_hf.data.sources import DataSource
from mecoq_hf.data.transforms import build_eval_transform
from mecoq_hf.retrieval.image_index import ImageIndex, SearchHit, read_image
from mecoq_hf.retrieval.index import CodeIndex
from mecoq_hf.retrieval.scoring import SearchSettings
from mecoq_hf.retrieval.sidecar import IndexSidecar, sidecar_path

FIXTURES = Path(__file__).parent / "fixtures"


# the sidecar


def small_index(count: int = 500) -> CodeIndex:
    generator = torch.Generator().manual_seed(0)
    index = CodeIndex(F.normalize(torch.randn(4, 256, 8, generator=generator), dim=-1))
    index.add_embeddings(torch.randn(count, 32, generator=generator), ids=torch.arange(count) * 7 + 3)
    return index


def test_sidecar_describes_the_ids_next_to_the_index(tmp_path):
    index = small_index()
    path = index.save(tmp_path / "new" / "folder" / "index.safetensors")  # missing folders are created
    assert path.is_file() and IndexSidecar.load(path) is None  # an index without a sidecar
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    labels = [[1, 0], [0, 1]] + [[0, 0]] * 498  # multi-hot
    sidecar = IndexSidecar.describe(model=model_folder, data={"source": "fashion-mnist", "limit": 500},
                                    ids=index.ids.tolist(), labels=labels, class_names=["cat", "dog"],
                                    paths=[None] * 500)  # fmt: skip
    written = sidecar.save(path)
    assert written == tmp_path / "new" / "folder" / "index.meta.json" == sidecar_path(path)
    assert sorted(p.name for p in written.parent.iterdir()) == ["index.meta.json", "index.safetensors"]
    loaded = IndexSidecar.load(path)
    assert loaded == sidecar and loaded.model == str(model_folder.resolve()) and loaded.data["limit"] == 500
    assert loaded.paths is None  # no image has a file
    assert loaded.label_texts([3, 10, 17, 999]) == ["cat", "dog", "-", "-"]  # 999 is not an id
    other = IndexSidecar.describe(model="org/model", data={}, ids=[3, 10], paths=["/a.png", None])
    other.save(path)
    assert IndexSidecar.load(path).model == "org/model" and IndexSidecar.load(path).paths == ["/a.png", None]
    assert IndexSidecar.load(path).label_texts([3]) is None and IndexSidecar.load(path).paths_of([10, 3]) == [
        None,
        "/a.png",
    ]
    with pytest.raises(ValueError, match="2 ids but 1 labels"):
        IndexSidecar(model="m", data={}, ids=[1, 2], labels=[0])

    sidecar_path(path).write_text('{"format": "mecoq-hf/splits"}')
    with pytest.raises(ValueError, match="is not a mecoq index sidecar"):
        IndexSidecar.load(path)
    sidecar_path(path).write_text('{"format": "mecoq-hf/index-side')
    with pytest.raises(ValueError, match="Index sidecar .* is not valid JSON"):
        IndexSidecar.load(path)
    sidecar_path(path).write_text('{"format": "mecoq-hf/index-sidecar", "version": 1}')
    with pytest.raises(ValueError, match="lacks the model, data or ids"):
        IndexSidecar.load(path)


def test_a_sidecar_written_by_0_1_0_reads_as_then():
    sidecar = IndexSidecar.load(FIXTURES / "index_saved_by_0.1.0" / "index.safetensors")
    assert sidecar.model == "org/tiny-model" and sidecar.data["split"] == "train" and len(sidecar.ids) == 24
    assert sidecar.label_texts([5, 8, 11]) == ["a", "b", "c"] and sidecar.paths_of([5]) is None


# an index of a dataset, built from a saved model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = MeCoQConfig(backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=16,
                         num_codebooks=2, codebook_size=256)  # fmt: skip
    folder = tmp_path_factory.mktemp("model")
    MeCoQModel(config).save_pretrained(folder)
    return folder


def test_build_save_load_and_search_with_an_image(saved_model, tmp_path):
    from mecoq_hf.hub import load_model

    model, source = load_model(saved_model), DataSource("fashion-mnist", "test", 40)
    images = source.load()
    built = ImageIndex.build(model, images, model_source=saved_model, data=source.to_dict(), batch_size=16,
                             show_progress_bar=False)  # fmt: skip
    assert built.index.ntotal == 40 and torch.equal(built.index.ids, torch.tensor(images["index"]))
    assert built.index.settings == SearchSettings.from_config(model.config)
    (tmp_path / "fmnist.meta.json").write_text("{}")  # a sidecar of an older build: removed by the save
    path = built.save(tmp_path / "fmnist.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmnist.safetensors"]  # one file: codes and labels

    index = ImageIndex.load(path)
    assert index.sidecar == built.sidecar and index.sidecar.class_names[0] == "T-shirt/top"
    reloaded = index.load_model()  # the model recorded in the sidecar, codebooks checked
    query_path = tmp_path / "query.png"
    images[7]["image"].save(query_path)  # a database image, saved losslessly
    hits = index.search(reloaded, query_path, k=5)
    pixels = build_eval_transform(model.backbone.data_config)(images[7]["image"])[None]
    with torch.no_grad():
        expected = index.index.search(model.embed(pixels), k=5)
    assert [hit.id for hit in hits] == expected.ids[0].tolist()
    assert [hit.score for hit in hits] == expected.scores[0].tolist()
    names = images.features["label"].names
    assert hits[0] == SearchHit(hits[0].id, hits[0].score, names[images[hits[0].id]["label"]], None)
    assert [image.size for image in index.images([hit.id for hit in hits])] == [(28, 28)] * 5
    assert index.search(reloaded, read_image(query_path), k=5) == hits  # a PIL image works as well
    assert len(index.search(reloaded, query_path, k=100)) == 40  # missing results are left out


def test_a_model_with_other_codebooks_is_refused(saved_model, tmp_path):
    from mecoq_hf.hub import load_model

    model, source = load_model(saved_model), DataSource("fashion-mnist", "test", 10)
    path = ImageIndex.build(model, source.load(), model_source=saved_model, data=source.to_dict(),
                            show_progress_bar=False).save(tmp_path / "index.safetensors")  # fmt: skip
    other = tmp_path / "other-model"
    torch.manual_seed(1)
    MeCoQModel(model.config).save_pretrained(other)  # same architecture, other random codebooks
    index = ImageIndex.load(path)
    with pytest.raises(ValueError, match=r"index\.safetensors was built with other codebooks than the model"):
        index.load_model(other)
    assert torch.equal(index.load_model(saved_model).normalized_codebooks(), model.normalized_codebooks())


def test_missing_files_and_a_missing_sidecar_are_named(saved_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist. Build it with `mecoq index build`"):
        ImageIndex.load(tmp_path / "none.safetensors")
    path = small_index(20).save(tmp_path / "bare.safetensors")
    bare = ImageIndex.load(path)
    assert bare.sidecar is None and bare.model_source(saved_model) == str(saved_model)
    with pytest.raises(
        ValueError, match=r"No model: pass --model MODEL_DIR \(the index has no bare\.meta\.json\)"
    ):
        bare.model_source()
    with pytest.raises(ValueError, match="recorded in bare.meta.json by `mecoq index build`; it is missing"):
        bare.images([3])
    with pytest.raises(FileNotFoundError, match="Query image .* does not exist"):
        read_image(tmp_path / "missing.png")

"""Hub sharing against the local Hub-compatible server (tests/hub_server.py), using the real huggingface_hub.

The `local_hub` fixture (tests/conftest.py) starts the server once per session and turns offline mode off for
one test at a time; see conftest.py for why HF_ENDPOINT is set there and how HF_HUB_OFFLINE=1 is overridden.
Sections: the raw client against the server, folder/codebook/index sharing, the model card on the Hub,
then models. The card's content is tested in tests/test_model_card.py.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from PIL import Image
from real_data import require_foolbox_data
from safetensors.torch import save_file
from test_model_card import RUN_RECORD
from tiny_runs import TINY_MODEL

from mecoq_hf import MeCoQConfig, MeCoQModel
from mecoq_hf.hub import (
    HubUploadError,
    download_codebooks,
    load_index_from_hub,
    push_folder_to_hub,
    push_index_to_hub,
    push_model_to_hub,
)
from mecoq_hf.model_card import build_model_card
from mecoq_hf.models.mecoq.quantization import decode_codes, load_codebooks, save_codebooks
from mecoq_hf.retrieval.index import CodeIndex

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = {**TINY_MODEL, "memory_size": 8}
_repo_counter = itertools.count()


def new_repo_id(name: str = "repo") -> str:
    """A repo id not used before in this session (the server keeps its repos for the whole session)."""
    return f"mecoq-tests/{name}-{next(_repo_counter)}"


def make_folder(root: Path) -> Path:
    """A small folder with a text file, a nested JSON file and a binary (LFS) safetensors file.

    The weights differ from call to call: the server keeps LFS content for the whole session, and a test of
    the upload path must not find its content already stored.
    """
    folder = root / "to_upload"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("first version\n")
    (folder / "sub" / "settings.json").write_text(json.dumps({"alpha": 10}))
    weights = torch.arange(12, dtype=torch.float32).reshape(3, 4) + next(_repo_counter)
    save_file({"weights": weights}, folder / "weights.safetensors")
    return folder


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def real_photos(count: int = 4) -> list[Image.Image]:
    """ImageNet photos shipped with foolbox (docs/environment.md §6); foolbox itself is never imported."""
    paths = sorted(require_foolbox_data().glob("imagenet_*"))[:count]
    return [Image.open(path).convert("RGB") for path in paths]


# the server and the raw huggingface_hub client


def test_create_repo_is_idempotent_with_exist_ok(local_hub):
    api = HfApi()
    repo_id = new_repo_id()
    first = api.create_repo(repo_id)
    second = api.create_repo(repo_id, exist_ok=True)
    assert first.repo_id == second.repo_id == repo_id
    assert first.endswith(f"/{repo_id}") and first.startswith(local_hub.url)
    with pytest.raises(HfHubHTTPError) as raised:
        api.create_repo(repo_id)
    assert raised.value.response.status_code == 409
    assert api.list_repo_files(repo_id) == [".gitattributes"]  # a new repo has one initial commit


def test_upload_folder_then_download_each_file(local_hub, tmp_path):
    api = HfApi()
    repo_id = new_repo_id()
    api.create_repo(repo_id)
    folder = make_folder(tmp_path)
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id)
    assert re.fullmatch(r"[0-9a-f]{40}", commit.oid)
    assert sorted(api.list_repo_files(repo_id)) == [
        ".gitattributes",
        "notes.txt",
        "sub/settings.json",
        "weights.safetensors",
    ]
    for name, digest in folder_digest(folder).items():
        downloaded = Path(hf_hub_download(repo_id, name))
        assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == digest
    tree = {entry.path: entry for entry in api.list_repo_tree(repo_id, recursive=True)}
    assert tree["weights.safetensors"].lfs is not None  # binary files go through the LFS batch API and a PUT
    assert tree["notes.txt"].lfs is None
    assert local_hub.requests_matching("PUT", r"^/_lfs/"), "the LFS upload path was not exercised"


def test_snapshot_download_fetches_the_whole_repo(local_hub, tmp_path):
    api = HfApi()
    repo_id = new_repo_id()
    api.create_repo(repo_id)
    folder = make_folder(tmp_path)
    api.upload_folder(folder_path=folder, repo_id=repo_id)
    snapshot = Path(snapshot_download(repo_id))
    assert {k: v for k, v in folder_digest(snapshot).items() if k != ".gitattributes"} == folder_digest(
        folder
    )


def test_second_push_makes_a_new_commit_and_old_revisions_still_resolve(local_hub):
    api = HfApi()
    repo_id = new_repo_id()
    api.create_repo(repo_id)
    first = api.upload_file(path_or_fileobj=b"version 1", path_in_repo="notes.txt", repo_id=repo_id)
    second = api.upload_file(path_or_fileobj=b"version 2", path_in_repo="notes.txt", repo_id=repo_id)
    assert first.oid != second.oid
    history = [commit.commit_id for commit in api.list_repo_commits(repo_id)]
    assert history[:2] == [second.oid, first.oid] and len(history) == 3  # + the initial commit
    assert api.repo_info(repo_id).sha == second.oid  # main points to the latest commit
    assert Path(hf_hub_download(repo_id, "notes.txt")).read_bytes() == b"version 2"
    assert Path(hf_hub_download(repo_id, "notes.txt", revision=first.oid)).read_bytes() == b"version 1"
    assert Path(hf_hub_download(repo_id, "notes.txt", revision=first.oid[:10])).read_bytes() == b"version 1"


def test_unchanged_upload_makes_no_commit(local_hub):
    api = HfApi()
    repo_id = new_repo_id()
    api.create_repo(repo_id)
    first = api.upload_file(path_or_fileobj=b"same", path_in_repo="notes.txt", repo_id=repo_id)
    again = api.upload_file(path_or_fileobj=b"same", path_in_repo="notes.txt", repo_id=repo_id)
    assert again.oid == first.oid
    assert len(local_hub.commits(repo_id)) == 2


def test_missing_file_repo_and_revision_raise_the_hub_errors(local_hub):
    api = HfApi()
    repo_id = new_repo_id()
    api.create_repo(repo_id)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "does-not-exist.txt")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(new_repo_id("never-created"), "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")


def test_dataset_repos_are_separate_from_model_repos(local_hub, tmp_path):
    api = HfApi()
    repo_id = new_repo_id("data")
    api.create_repo(repo_id, repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b"label,path\n0,a.png\n",
        path_in_repo="data/train.csv",
        repo_id=repo_id,
        repo_type="dataset",
    )
    assert api.list_repo_files(repo_id, repo_type="dataset") == [".gitattributes", "data/train.csv"]
    path = hf_hub_download(repo_id, "data/train.csv", repo_type="dataset")
    assert Path(path).read_bytes() == b"label,path\n0,a.png\n"
    assert "datasets--mecoq-tests" in path
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files(repo_id)  # no model repo of that name


def test_private_repo_needs_a_token(local_hub):
    api = HfApi()
    repo_id = new_repo_id("private")
    api.create_repo(repo_id, private=True, token="hf_test_token")
    api.upload_file(
        path_or_fileobj=b"secret", path_in_repo="notes.txt", repo_id=repo_id, token="hf_test_token"
    )
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "notes.txt", token=False)
    assert Path(hf_hub_download(repo_id, "notes.txt", token="hf_test_token")).read_bytes() == b"secret"


def test_download_resumes_after_a_truncated_transfer(local_hub):
    api = HfApi()
    repo_id = new_repo_id()
    api.create_repo(repo_id)
    payload = bytes(range(256)) * 64
    api.upload_file(path_or_fileobj=payload, path_in_repo="blob.bin", repo_id=repo_id)
    resolve = rf"^/{re.escape(repo_id)}/resolve/.*/blob\.bin$"
    local_hub.inject_fault("GET", resolve, kind="truncate")
    assert Path(hf_hub_download(repo_id, "blob.bin")).read_bytes() == payload
    assert len(local_hub.requests_matching("GET", resolve)) == 2  # cut, then resumed


# folders, codebooks and indexes through mecoq_hf.hub


def test_push_folder_to_hub_uploads_everything_in_one_commit(local_hub, tmp_path):
    folder = make_folder(tmp_path)
    repo_id = new_repo_id()
    commit = push_folder_to_hub(folder, repo_id, commit_message="Add files")
    commits = local_hub.commits(repo_id)
    assert len(commits) == 2 and commits[0].sha == commit.oid and commits[0].title == "Add files"
    assert set(commits[0].files) == {".gitattributes", *folder_digest(folder)}
    assert Path(hf_hub_download(repo_id, "sub/settings.json")).read_text() == json.dumps({"alpha": 10})


def test_push_folder_to_hub_sends_the_token_and_creates_the_repo_once(local_hub, tmp_path):
    folder = make_folder(tmp_path)
    repo_id = new_repo_id()
    push_folder_to_hub(folder, repo_id, token="hf_abc123")
    push_folder_to_hub(folder, repo_id, token="hf_abc123")  # exist_ok; unchanged files make no new commit
    assert len(local_hub.commits(repo_id)) == 2
    path = f"/api/models/{repo_id}/commit/main"
    assert [r.authorization for r in local_hub.requests_matching("POST", re.escape(path))] == [
        "Bearer hf_abc123"
    ]


def test_push_folder_to_hub_to_a_dataset_repo_and_a_branch(local_hub, tmp_path):
    folder = make_folder(tmp_path)
    repo_id = new_repo_id("data")
    commit = push_folder_to_hub(folder, repo_id, repo_type="dataset", revision="dev")
    api = HfApi()
    assert api.list_repo_files(repo_id, repo_type="dataset") == [".gitattributes"]  # main untouched
    assert "weights.safetensors" in api.list_repo_files(repo_id, repo_type="dataset", revision="dev")
    assert api.dataset_info(repo_id, revision="dev").sha == commit.oid


def test_push_folder_to_hub_creates_a_space_with_its_sdk(local_hub, tmp_path):
    folder = make_folder(tmp_path)
    repo_id = new_repo_id("space")
    with warnings.catch_warnings():  # huggingface_hub warns about data files in a Space
        warnings.simplefilter("ignore")
        commit = push_folder_to_hub(folder, repo_id, repo_type="space")
    api = HfApi()
    assert "sub/settings.json" in api.list_repo_files(repo_id, repo_type="space")
    assert api.space_info(repo_id).sha == commit.oid


@pytest.mark.parametrize(
    "bad_call, message",
    [
        (lambda tmp: push_folder_to_hub(tmp / "missing", "a/b"), "not an existing directory"),
        (lambda tmp: push_folder_to_hub(tmp, "a/b"), "no file to upload"),
        (lambda tmp: push_folder_to_hub(tmp, "a/b", repo_type="bucket"), "repo_type must be one of"),
    ],
)
def test_push_folder_to_hub_rejects_bad_arguments_before_any_request(local_hub, tmp_path, bad_call, message):
    before = len(local_hub.requests)
    with pytest.raises(ValueError, match=message):
        bad_call(tmp_path)
    assert len(local_hub.requests) == before


@pytest.mark.parametrize("kind", ["status", "drop"])
def test_failed_commit_raises_a_clear_error_and_changes_nothing(local_hub, tmp_path, kind):
    folder = make_folder(tmp_path)
    repo_id = new_repo_id()
    HfApi().create_repo(repo_id)
    before = folder_digest(folder)
    local_hub.inject_fault("POST", r"/commit/", kind=kind, status=500)  # the client does not retry commits
    with pytest.raises(HubUploadError, match=rf"Could not push folder .* '{re.escape(repo_id)}'") as raised:
        push_folder_to_hub(folder, repo_id)
    assert "Local files were not changed" in str(raised.value)
    assert raised.value.__cause__ is not None
    assert len(local_hub.commits(repo_id)) == 1  # only the initial commit
    assert folder_digest(folder) == before


def test_transient_upload_failure_is_retried_by_the_client(local_hub, tmp_path):
    folder = make_folder(tmp_path)
    repo_id = new_repo_id()
    local_hub.inject_fault(
        "PUT", r"^/_lfs/", kind="status", status=503
    )  # once; huggingface_hub retries after 1 s
    commit = push_folder_to_hub(folder, repo_id)
    assert local_hub.commits(repo_id)[0].sha == commit.oid
    assert len(local_hub.requests_matching("PUT", r"^/_lfs/")) == 2
    downloaded = Path(hf_hub_download(repo_id, "weights.safetensors")).read_bytes()
    assert downloaded == (folder / "weights.safetensors").read_bytes()


def test_download_codebooks_returns_the_saved_tensor(local_hub, tmp_path):
    codebooks = torch.nn.functional.normalize(
        torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    folder = tmp_path / "model"
    folder.mkdir()
    save_codebooks(folder / "codebooks.safetensors", codebooks)
    repo_id = new_repo_id()
    first = push_folder_to_hub(folder, repo_id)
    save_codebooks(folder / "codebooks.safetensors", -codebooks)
    push_folder_to_hub(folder, repo_id)
    assert torch.equal(download_codebooks(repo_id), -codebooks)
    assert torch.equal(download_codebooks(repo_id, revision=first.oid), codebooks)
    assert download_codebooks(repo_id).shape == (4, 16, 8)


def test_download_codebooks_rejects_a_foreign_file(local_hub, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"something_else": torch.zeros(2, 3)}, folder / "codebooks.safetensors")
    repo_id = new_repo_id()
    push_folder_to_hub(folder, repo_id)
    with pytest.raises(ValueError, match="codebooks"):
        download_codebooks(repo_id)
    empty = new_repo_id("empty")
    HfApi().create_repo(empty)
    with pytest.raises(EntryNotFoundError):
        download_codebooks(empty)


def test_index_round_trip_through_a_dataset_repo(local_hub, tmp_path):
    generator = torch.Generator().manual_seed(0)
    codebooks = torch.nn.functional.normalize(torch.randn(2, 16, 8, generator=generator), dim=-1)
    index = CodeIndex(codebooks)
    index.add_embeddings(torch.randn(50, 16, generator=generator))
    path = index.save(tmp_path / "index.safetensors")
    repo_id = new_repo_id("index")
    push_index_to_hub(path, repo_id)
    assert "index.safetensors" in HfApi().list_repo_files(repo_id, repo_type="dataset")
    loaded = load_index_from_hub(repo_id)
    queries = torch.randn(3, 16, generator=generator)
    expected, got = index.search(queries, k=5), loaded.search(queries, k=5)
    assert loaded.ntotal == 50
    assert torch.equal(got.ids, expected.ids) and torch.equal(got.scores, expected.scores)


def test_push_index_refuses_a_damaged_file_before_uploading(local_hub, tmp_path):
    codebooks = torch.nn.functional.normalize(torch.randn(2, 16, 8), dim=-1)
    index = CodeIndex(codebooks)
    index.add_embeddings(torch.randn(10, 16))
    path = index.save(tmp_path / "index.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip one bit of the last tensor
    path.write_bytes(bytes(data))
    before = len(local_hub.requests)
    with pytest.raises(ValueError, match="checksum"):
        push_index_to_hub(path, new_repo_id("index"))
    assert len(local_hub.requests) == before


# model cards on the Hub


def test_card_and_its_model_index_survive_push_and_load(local_hub):
    rendered_card = build_model_card(copy.deepcopy(RUN_RECORD), repo_id="mecoq-tests/fmnist-32")
    repo_id = new_repo_id("card")
    HfApi().create_repo(repo_id)
    rendered_card.push_to_hub(repo_id)  # validates the YAML through the server, then commits README.md
    assert local_hub.requests_matching("POST", r"^/api/validate-yaml$")
    loaded = ModelCard.load(repo_id)
    assert loaded.data.eval_results == rendered_card.data.eval_results
    assert loaded.data.model_name == "fmnist-32"
    assert loaded.text == rendered_card.text


# models (push, pull, remote code)


@pytest.fixture(scope="module")
def tiny_model() -> MeCoQModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MeCoQModel(MeCoQConfig.from_preset("paper", **TINY)).eval()


@pytest.fixture(scope="module")
def photo_pixels(tiny_model) -> torch.Tensor:
    return tiny_model.image_processor()(real_photos())["pixel_values"]  # (4, 3, 32, 32)


def assert_same_outputs(model: torch.nn.Module, reference: MeCoQModel, pixel_values: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(model.embed(pixel_values), reference.embed(pixel_values))
    assert torch.equal(model.encode(pixel_values), reference.encode(pixel_values))


def test_push_model_to_hub_publishes_everything_in_one_commit(local_hub, tiny_model, photo_pixels):
    repo_id = new_repo_id("model")
    commit = push_model_to_hub(tiny_model, repo_id, run_record=RUN_RECORD, token="hf_model_token")
    commits = local_hub.commits(repo_id)
    assert len(commits) == 2 and commits[0].sha == commit.oid
    files = set(commits[0].files)
    assert {
        "config.json",
        "model.safetensors",
        "codebooks.safetensors",
        "preprocessor_config.json",
        "README.md",
        "modeling_mecoq.py",
        "configuration_mecoq.py",
        "quantization.py",
    } <= files
    assert not any("__pycache__" in name for name in files)
    loaded = MeCoQModel.from_pretrained(repo_id).eval()
    assert_same_outputs(loaded, tiny_model, photo_pixels)
    card = ModelCard.load(repo_id)
    assert {r.metric_type for r in card.data.eval_results} == {"map@1000", "map@100"}


def test_push_model_folder_leaves_the_folder_unchanged_and_adds_a_card(local_hub, tiny_model, tmp_path):
    folder = tmp_path / "saved"
    tiny_model.save_pretrained(folder)
    before = folder_digest(folder)
    repo_id = new_repo_id("model")
    push_model_to_hub(folder, repo_id)  # no run record: card from config.json alone
    assert folder_digest(folder) == before and not (folder / "README.md").exists()
    card = ModelCard.load(repo_id)
    assert "M = 2 codebooks of K = 16 codewords" in card.text
    assert "<!-- No evaluation results were recorded for this model. -->" in card.text


def test_push_model_card_precedence_over_the_folder_readme(local_hub, tiny_model, tmp_path):
    folder = tmp_path / "saved"
    tiny_model.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# Hand-written card\n")
    kept, replaced = new_repo_id("model"), new_repo_id("model")
    push_model_to_hub(folder, kept)  # no run record: the folder's own card is published as it is
    push_model_to_hub(folder, replaced, run_record=RUN_RECORD)  # a run record: the rendered card replaces it
    assert Path(hf_hub_download(kept, "README.md")).read_text() == (folder / "README.md").read_text()
    assert ModelCard.load(replaced).data.license == "apache-2.0"
    assert "Hand-written card" not in ModelCard.load(replaced).text


def test_push_model_rejects_a_folder_that_is_not_a_mecoq_model(local_hub, tmp_path):
    folder = make_folder(tmp_path)
    with pytest.raises(
        ValueError, match="missing config.json, codebooks.safetensors, preprocessor_config.json"
    ):
        push_model_to_hub(folder, new_repo_id())


def test_failed_model_push_leaves_no_staging_folder(local_hub, tiny_model, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    repo_id = new_repo_id("model")
    local_hub.inject_fault("POST", r"/commit/", kind="drop")
    with pytest.raises(HubUploadError, match="Could not push MeCoQ model"):
        push_model_to_hub(tiny_model, repo_id)
    assert list(tmp_path.glob("mecoq-push-*")) == []
    assert len(local_hub.commits(repo_id)) == 1


def test_transformers_push_to_hub_round_trip(local_hub, tiny_model, photo_pixels):
    repo_id = new_repo_id("model")
    tiny_model.push_to_hub(repo_id)
    files = set(HfApi().list_repo_files(repo_id))
    assert {
        "config.json",
        "model.safetensors",
        "codebooks.safetensors",
        "modeling_mecoq.py",
        "README.md",
    } <= files
    loaded = MeCoQModel.from_pretrained(repo_id).eval()
    assert_same_outputs(loaded, tiny_model, photo_pixels)


def test_codebooks_alone_decode_codes_made_elsewhere(local_hub, tiny_model, photo_pixels):
    repo_id = new_repo_id("model")
    push_model_to_hub(tiny_model, repo_id)
    codes = tiny_model.encode(photo_pixels)  # (4, 2), made "elsewhere"
    path = hf_hub_download(repo_id, "codebooks.safetensors")
    assert torch.equal(decode_codes(codes, load_codebooks(path)), tiny_model.decode(codes))
    assert torch.equal(download_codebooks(repo_id), tiny_model.normalized_codebooks().detach())


def test_card_usage_snippet_runs_against_the_hub(local_hub, tiny_model):
    repo_id = new_repo_id("model")
    push_model_to_hub(tiny_model, repo_id, run_record=RUN_RECORD)
    snippet = re.search(r"```python\n(.*?)```", ModelCard.load(repo_id).text, re.DOTALL).group(1)
    assert f'MeCoQModel.from_pretrained("{repo_id}")' in snippet
    namespace: dict = {}
    exec(compile(snippet, "model card usage snippet", "exec"), namespace)  # noqa: S102 - our own card
    assert namespace["embeddings"].shape == (2, 16)
    assert namespace["codes"].shape == (2, 2) and namespace["codes"].dtype == torch.uint8
    assert torch.equal(namespace["codes"], tiny_model.encode(namespace["pixel_values"]))


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["mecoq_hf"] = None  # even if mecoq-hf is pip-installed, this interpreter cannot import it
    try:
        import mecoq_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("mecoq_hf is importable in the child process")
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    pixel_values = load_file(sys.argv[2])["pixel_values"]
    with torch.no_grad():
        embeddings = model.embed(pixel_values)
    save_file({"embeddings": embeddings, "codes": model.encode(pixel_values)}, sys.argv[3])
    """
)


@pytest.mark.slow
def test_trust_remote_code_loads_without_the_package(
    local_hub, local_hub_subprocess_env, tiny_model, photo_pixels, tmp_path
):
    from safetensors.torch import load_file

    repo_id = new_repo_id("model")
    push_model_to_hub(tiny_model, repo_id)
    save_file({"pixel_values": photo_pixels.contiguous()}, tmp_path / "inputs.safetensors")
    (tmp_path / "child.py").write_text(REMOTE_CODE_SCRIPT)
    completed = subprocess.run(
        [sys.executable, "child.py", repo_id, "inputs.safetensors", "outputs.safetensors"],
        cwd=tmp_path,
        env=local_hub_subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    outputs = load_file(tmp_path / "outputs.safetensors")
    with torch.no_grad():
        assert torch.equal(outputs["embeddings"], tiny_model.embed(photo_pixels))
    assert torch.equal(outputs["codes"], tiny_model.encode(photo_pixels))

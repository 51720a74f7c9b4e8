"""`mecoq index build` in shards (sharded_build.py, build_lock.py): the same index as one pass, resumption
after SIGKILL, two Accelerate processes encoding disjoint shards, one writer at a time, and index files that
carry their own labels (no index/metadata pair to mix up). Commands run from a scratch folder, as users do."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lock_holder import lock_held_elsewhere

from mecoq_hf import MeCoQConfig, MeCoQModel, cli
from mecoq_hf.data.sources import DataSource
from mecoq_hf.hub import load_model
from mecoq_hf.retrieval.build_lock import lock_path
from mecoq_hf.retrieval.image_index import ImageIndex
from mecoq_hf.retrieval.index import CodeIndex
from mecoq_hf.retrieval.sharded_build import parts_folder

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = MeCoQConfig(backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=16,
                         num_codebooks=2, codebook_size=256)  # fmt: skip
    folder = tmp_path_factory.mktemp("model")
    MeCoQModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(saved_model) -> ImageIndex:
    """The index of the first 400 test images built in one pass in memory (`ImageIndex.build`)."""
    source = DataSource("fashion-mnist", "test", 400)
    return ImageIndex.build(load_model(saved_model), source.load(), model_source=saved_model,
                            data=source.to_dict(), show_progress_bar=False)  # fmt: skip


def build_command(model: Path, output: str, *extra: str, limit: int = 400) -> list[str]:
    return ["index", "build", str(model), "--dataset", "fashion-mnist", "--split", "test", "--limit",
            str(limit), "--output", output, "--no-progress", *extra]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip


def mecoq(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mecoq_hf.cli", *argv], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def assert_same_index(path: Path, reference: ImageIndex) -> None:
    built = ImageIndex.load(path)
    assert torch.equal(built.index.codes, reference.index.codes)
    assert torch.equal(built.index.ids, reference.index.ids)
    assert built.sidecar.labels == reference.sidecar.labels and built.sidecar.data == reference.sidecar.data
    assert built.sidecar.class_names == reference.sidecar.class_names


def test_a_sharded_build_equals_one_pass(saved_model, reference, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(build_command(saved_model, "fmnist.safetensors", "--shard-size", "150")) == 0
    assert "Indexed 400 images of fashion-mnist (exhaustive" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmnist.safetensors"]  # no parts, lock or sidecar
    assert_same_index(tmp_path / "fmnist.safetensors", reference)
    assert ImageIndex.load(tmp_path / "fmnist.safetensors").index.file.version == 2


@pytest.mark.slow
def test_an_interrupted_build_resumes_to_the_same_index(saved_model, reference, tmp_path):
    command = build_command(saved_model, "fmnist.safetensors", "--shard-size", "50", "--batch-size", "2")
    process = mecoq(command, tmp_path)
    first_shard = parts_folder(tmp_path / "fmnist.safetensors") / "shard-00000.safetensors"
    deadline = time.monotonic() + 300
    while not first_shard.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()[-2000:]
    shards = sorted(p.name for p in parts_folder(tmp_path / "fmnist.safetensors").glob("shard-*"))
    assert 1 <= len(shards) < 8 and not (tmp_path / "fmnist.safetensors").exists()
    first_bytes = first_shard.read_bytes()
    resumed = mecoq(command, tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "Indexed 400 images" in out
    assert_same_index(tmp_path / "fmnist.safetensors", reference)
    assert not parts_folder(tmp_path / "fmnist.safetensors").exists()
    assert len(first_bytes) > 0  # the kept shard was reused, not rewritten (its bytes were complete)


@pytest.mark.slow
def test_two_accelerate_processes_encode_disjoint_shards(saved_model, reference, tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    env = subprocess_env()
    env.pop("ACCELERATE_USE_CPU", None)  # `build_accelerator` joins CPU processes over gloo by itself
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "mecoq_hf.cli", *build_command(saved_model, "fmnist.safetensors", "--shard-size", "60",
                                                   "--backend", "ivf", "--nlist", "4")]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    # Both ranks print to one pipe: their lines may run together, so match anywhere in the output.
    found = re.findall(r"rank (\d/2) encodes shards (\[[\d, ]*\])", result.stdout)
    ranks = {rank: json.loads(shards) for rank, shards in found}
    assert set(ranks) == {"0/2", "1/2"}
    assert sorted(ranks["0/2"] + ranks["1/2"]) == list(range(7)) and not set(ranks["0/2"]) & set(ranks["1/2"])
    assert result.stdout.count("Indexed 400 images") == 1  # merged once, by the main process
    assert_same_index(tmp_path / "fmnist.safetensors", reference)
    built = CodeIndex.load(tmp_path / "fmnist.safetensors", backend="ivf", nprobe=4)
    queries = torch.randn(5, 16)
    assert torch.equal(built.search(queries, 20).ids, reference.index.search(queries, 20).ids)


def test_a_second_writer_is_refused_while_a_build_holds_the_lock(saved_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with lock_held_elsewhere(lock_path(tmp_path / "fmnist.safetensors")) as pid:
        status = cli.main(build_command(saved_model, "fmnist.safetensors", limit=20))
        err = capsys.readouterr().err
        assert status == 2
        assert f"Another `mecoq index build` (pid {pid}) is writing fmnist.safetensors" in err
        assert "write to another --output" in err
    assert not lock_path(tmp_path / "fmnist.safetensors").exists()  # released and removed
    assert cli.main(build_command(saved_model, "fmnist.safetensors", limit=20)) == 0


@pytest.mark.slow
def test_two_concurrent_builds_of_one_output_never_mix(saved_model, tmp_path):
    """Two real `mecoq index build` processes, 200 and 196 images, to the same output, started together: one
    is refused (or they ran one after the other), and the file always matches its own labels."""
    first = mecoq(build_command(saved_model, "shared.safetensors", "--batch-size", "2", limit=200), tmp_path)
    second = mecoq(build_command(saved_model, "shared.safetensors", "--batch-size", "2", limit=196), tmp_path)
    results = [(process.wait(timeout=600), *process.communicate()) for process in (first, second)]
    statuses = sorted(status for status, _, _ in results)
    assert statuses in ([0, 0], [0, 2]), [err[-2000:] for _, _, err in results]
    if statuses == [0, 2]:
        refused = next(err for status, _, err in results if status == 2)
        assert "Another `mecoq index build` (pid" in refused and "is writing shared.safetensors" in refused
    built = ImageIndex.load(tmp_path / "shared.safetensors")
    truth = DataSource("fashion-mnist", "test", built.index.ntotal).load()
    assert built.sidecar.labels == truth["label"] and built.index.ids.tolist() == truth["index"]


def test_search_prints_the_labels_of_the_file_it_reads(saved_model, tmp_path, monkeypatch, capsys):
    """Before: an index file of one build next to the metadata of another printed wrong labels, exit 0."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(build_command(saved_model, "index.safetensors", limit=64)) == 0
    shutil.copy(tmp_path / "index.safetensors", tmp_path / "build-64.safetensors")
    assert cli.main(build_command(saved_model, "index.safetensors", limit=60)) == 0
    shutil.copy(tmp_path / "build-64.safetensors", tmp_path / "index.safetensors")  # the 64-item build's file
    images = DataSource("fashion-mnist", "test", 64).load()
    images[63]["image"].save(tmp_path / "query.png")  # an item only the 64-item build holds
    capsys.readouterr()
    assert cli.main(["search", "index.safetensors", "--image", "query.png", "--top-k", "64"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    names = images.features["label"].names
    printed = {int(row[1]): " ".join(row[3:]) for row in rows}
    assert len(printed) == 64 and printed == {i: names[images[i]["label"]] for i in range(64)}


def test_edited_labels_and_other_builds_metadata_are_refused(saved_model, tmp_path, monkeypatch, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    assert cli.main(build_command(saved_model, "index.safetensors", limit=30)) == 0
    with safe_open("index.safetensors", framework="pt") as file:
        tensors = {name: file.get_tensor(name).clone() for name in file.keys()}
        header = file.metadata()
    tensors["labels"][3] = (tensors["labels"][3] + 1) % 10  # a hand edit of one label
    save_file(tensors, "index.safetensors", metadata=header)
    DataSource("fashion-mnist", "test", 1).load()[0]["image"].save("query.png")
    capsys.readouterr()
    assert cli.main(["search", "index.safetensors", "--image", "query.png"]) == 2
    assert "fails its sha256 checksum: the file was modified" in capsys.readouterr().err
    # A version-1 index (0.1.0) with a JSON sidecar of another build: refused, not printed.
    shutil.copy(FIXTURES / "index_saved_by_0.1.0" / "index.safetensors", "old.safetensors")
    sidecar = json.loads((FIXTURES / "index_saved_by_0.1.0" / "index.meta.json").read_text())
    sidecar["ids"], sidecar["labels"] = sidecar["ids"][:20], sidecar["labels"][:20]
    Path("old.meta.json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match="describes 20 items that are not the index's 24 items"):
        ImageIndex.load("old.safetensors")


def test_wrong_backend_options_and_missing_on_disk_lists_are_named(
    saved_model, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    DataSource("fashion-mnist", "test", 1).load()[0]["image"].save("query.png")
    assert cli.main(build_command(saved_model, "flat.safetensors", limit=300)) == 0
    assert cli.main(build_command(saved_model, "ivf.safetensors", "--backend", "ivf", "--nlist", "4",
                                  limit=300)) == 0  # fmt: skip
    assert Path("ivf.ivf/lists.ivfdata").is_file()
    capsys.readouterr()
    cases = {
        ("flat.safetensors", "--nprobe", "2"): "--nprobe is an IVF setting",
        ("flat.safetensors", "--backend", "ivf"): "built without IVF lists",
        ("ivf.safetensors", "--nprobe", "9"): "nprobe must be an integer from 1 to nlist=4, got 9",
    }
    for arguments, message in cases.items():
        status = cli.main(["search", arguments[0], "--image", "query.png", *arguments[1:]])
        assert status == 2 and message in capsys.readouterr().err, arguments
    assert (
        cli.main(["search", "ivf.safetensors", "--image", "query.png", "--nprobe", "4", "--top-k", "3"]) == 0
    )
    assert "Top 3 of 300" in capsys.readouterr().out
    Path("ivf.ivf/lists.ivfdata").unlink()
    assert cli.main(["search", "ivf.safetensors", "--image", "query.png"]) == 2
    assert "lists.ivfdata is missing" in capsys.readouterr().err
    assert cli.main(build_command(saved_model, "x.safetensors", "--nlist", "4", limit=10)) == 2
    assert "pass --backend ivf with --nlist" in capsys.readouterr().err


def test_a_work_folder_of_another_build_is_refused(saved_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = parts_folder(tmp_path / "index.safetensors")
    folder.mkdir()
    (folder / "plan.json").write_text(json.dumps({"format": "mecoq-hf/index-build", "shard_size": 7}))
    assert cli.main(build_command(saved_model, "index.safetensors", limit=20)) == 2
    err = capsys.readouterr().err
    assert (
        "holds an interrupted build with other" in err and "shard_size" in err and "delete the folder" in err
    )
    assert not lock_path(tmp_path / "index.safetensors").exists()

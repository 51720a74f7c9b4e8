"""`mecoq push` uploads the model, not the run folder; killed saves leave nothing behind (issue: reliability,
item 6). Against the local Hub server of tests/hub_server.py, with a folder written by `mecoq train`."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

from mecoq_hf import MeCoQConfig, MeCoQModel, cli
from mecoq_hf.hub import model_files

TINY_CONFIG = {
    "model": dict(backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=16,
                  num_codebooks=2, codebook_size=256),
    "training": {"num_epochs": 1, "batch_size": 32, "report_to": []},
    "data": {"source": "fashion-mnist", "limit": 200, "num_query": 20, "num_validation": 20, "num_train": 64},
}  # fmt: skip
MODEL_FILES = {
    "config.json", "model.safetensors", "codebooks.safetensors", "preprocessor_config.json", "backbones.py",
    "configuration_mecoq.py", "file_access.py", "image_processing_mecoq.py", "kmeans.py", "losses.py",
    "memory.py", "modeling_mecoq.py", "quantization.py", "weights_checksum.py",
}  # fmt: skip
_REPOS = itertools.count()


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A `mecoq train` folder plus what a real run folder gathers: a feature cache, an index, metrics, and
    the staging folder of a final save that was killed."""
    warnings.simplefilter("ignore")
    scratch = tmp_path_factory.mktemp("scratch")
    (scratch / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    run = scratch / "run"
    assert cli.main(["train", "--config", str(scratch / "tiny.json"), "--output-dir", str(run),
                     "--no-progress"]) == 0  # fmt: skip
    (run / "feature_cache").mkdir()
    (run / "feature_cache" / "features.safetensors").write_bytes(b"\0" * 4096)
    (run / "index.safetensors").write_bytes(b"\0" * 1024)
    (run / "metrics.json").write_text(json.dumps({"metrics": {"map@100": 0.5}}))
    killed = run / f".saving-{dead_pid()}-x1y2"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half a file")
    return run


def test_push_lists_and_uploads_only_the_model_files(run_folder, local_hub, capsys):
    repo_id = f"mecoq-tests/reliability-{next(_REPOS)}"
    status = cli.main(["push", str(run_folder), repo_id, "--token", "hf_test", "--include", "metrics.json"])
    out = capsys.readouterr().out
    assert status == 0
    listing = out[: out.index("Pushed")]
    expected = MODEL_FILES | {"metrics.json"}
    assert f"Uploading {len(expected)} files" in listing
    assert {line.split()[0] for line in listing.splitlines()[1:]} == expected
    uploaded = set(HfApi().list_repo_files(repo_id))
    assert uploaded - {".gitattributes"} == expected | {"README.md"}  # the card is rendered on the way
    for left_local in ("checkpoints", "feature_cache", "index.safetensors", "log.jsonl", "splits.json",
                       "run_record.json", "training_args.json", ".saving-"):  # fmt: skip
        assert not any(name.startswith(left_local) for name in uploaded), left_local
    loaded = MeCoQModel.from_pretrained(repo_id)
    assert torch.equal(
        loaded.normalized_codebooks(), MeCoQModel.from_pretrained(run_folder).normalized_codebooks()
    )


def test_push_dry_run_and_a_bad_include(run_folder, capsys):
    status = cli.main(["push", str(run_folder), "me/never", "--dry-run"])
    out = capsys.readouterr().out
    assert status == 0 and "Dry run: nothing was uploaded." in out and "metrics.json" not in out
    assert model_files(run_folder) == sorted(MODEL_FILES)
    status = cli.main(["push", str(run_folder), "me/never", "--include", "no_such_file.json"])
    err = capsys.readouterr().err
    assert status == 2 and "--include 'no_such_file.json' matches no file" in err
    status = cli.main(["push", str(run_folder), "me/never", "--include", "../*"])
    assert status == 2 and "points outside the model folder" in capsys.readouterr().err


def test_a_killed_save_is_ignored_on_load_and_cleaned_on_the_next_save(tmp_path):
    model = MeCoQModel(MeCoQConfig(**TINY_CONFIG["model"]))
    model.save_pretrained(tmp_path)
    killed = [tmp_path / f".saving-{dead_pid()}-abc", tmp_path / ".saving-q7w8e9"]  # ours, an older version's
    live = tmp_path / f".saving-{os.getpid()}-live"  # a save still running in a live process
    for folder in [*killed, live]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half a file")
    reloaded = MeCoQModel.from_pretrained(tmp_path)  # the staging folders are not looked at
    assert torch.equal(reloaded.normalized_codebooks(), model.normalized_codebooks())
    model.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.glob(".saving-*")) == [live.name]

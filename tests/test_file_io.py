"""Files on disk: atomic writes, modes that follow the umask on every user path, "permission denied" reads."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from file_modes import UMASKS, modes_not_following, process_umask
from tiny_runs import TINY_MODEL

from mecoq_hf import MeCoQConfig, MeCoQModel, file_io
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.data.splits import SplitDefinition
from mecoq_hf.models.mecoq import file_access
from mecoq_hf.retrieval.index import CodeIndex
from mecoq_hf.retrieval.sidecar import IndexSidecar
from mecoq_hf.training.trainer import TrainingArguments, train

TINY = {**TINY_MODEL, "memory_size": 16}


def tiny_model() -> MeCoQModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MeCoQModel(MeCoQConfig(**TINY)).eval()


# write_atomic


def test_there_is_one_atomic_write_and_it_lives_in_the_model_closure():
    assert file_io.write_atomic is file_access.write_atomic
    assert file_io.check_readable is file_access.check_readable


@pytest.mark.parametrize("umask", UMASKS, ids=oct)
def test_write_atomic_replaces_the_file_with_a_mode_from_the_umask(tmp_path, umask):
    target = tmp_path / "folder" / "data.txt"
    with process_umask(umask):
        assert file_access.current_umask() == umask
        file_io.write_json(target, {"a": 1})
        file_io.write_atomic(target, lambda name: Path(name).write_text("second"))
        assert target.read_text() == "second"
        file_io.write_text(target, "third, naïve")
    assert target.read_text(encoding="utf-8") == "third, naïve" and os.listdir(target.parent) == ["data.txt"]
    assert modes_not_following(umask, tmp_path) == {}


def test_write_atomic_keeps_the_old_file_and_no_temporary_when_writing_fails(tmp_path):
    target = tmp_path / "data.txt"
    target.write_text("old")

    def half_write(name: str) -> None:
        Path(name).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        file_io.write_atomic(target, half_write)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["data.txt"]


def test_the_umask_read_from_proc_equals_the_one_set_and_leaves_it_alone():
    with process_umask(0o027):
        assert file_access._umask_from_proc() in (0o027, None)  # None where /proc is not mounted
        assert file_access._umask_by_setting() == 0o027
        assert file_access.current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # reading did not change it


# every user path writes files the umask explains


@pytest.mark.parametrize("umask", UMASKS, ids=oct)
def test_an_index_and_its_sidecar_follow_the_umask(tmp_path, umask):
    model = tiny_model()
    index = CodeIndex(model.normalized_codebooks())
    index.add(model.encode(torch.randn(5, 3, 32, 32)))
    with process_umask(umask):
        index.save(tmp_path / "index.safetensors")
        sidecar = IndexSidecar.describe(model="org/name", data={}, ids=index.ids.tolist())
        sidecar.save(tmp_path / "index.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["index.meta.json", "index.safetensors"]
    assert modes_not_following(umask, tmp_path) == {}


@pytest.mark.parametrize("umask", UMASKS, ids=oct)
def test_a_training_run_writes_checkpoints_model_and_cache_the_umask_explains(tmp_path, umask):
    warnings.simplefilter("ignore")
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        num_epochs=1,
        batch_size=8,
        checkpoint_every_steps=1,
        cached_views=2,
        feature_cache_dir=str(tmp_path / "run" / "features"),
        progress_bar=False,
        report_to=[],
        seed=0,
    )
    with process_umask(umask):
        train(MeCoQConfig(**TINY), args, load_fashion_mnist("test", limit=16))
    run = tmp_path / "run"
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [path.name for path in checkpoints] == ["step_1", "step_2"]
    assert (checkpoints[-1] / "model.safetensors").is_file()  # accelerate's own save_file
    assert list((run / "features").glob("views-*.safetensors"))
    assert {"model.safetensors", "codebooks.safetensors", "run_record.json"} <= set(os.listdir(run))
    assert modes_not_following(umask, run) == {}


# reads that lack permission say so


CHILD = textwrap.dedent(
    """
    import contextlib, io, json, os, sys
    from pathlib import Path

    from mecoq_hf import MeCoQModel, load_codebooks
    from mecoq_hf.cli import main
    from mecoq_hf.data.splits import SplitDefinition
    from mecoq_hf.hub import load_model
    from mecoq_hf.retrieval.index import CodeIndex

    root = Path(sys.argv[1])

    def search(base):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(["search", str(base / "index.safetensors"), "--model",
                         str(root / "readable" / "model"), "--image", str(root / "readable" / "query.png")])
        return [code, stderr.getvalue()]

    CASES = {
        "load_model weights": lambda base: load_model(base / "weights_model"),
        "load_model config": lambda base: load_model(base / "config_model"),
        "load_model folder": lambda base: load_model(base / "private" / "model"),
        "load_model missing": lambda base: load_model(base / "missing"),
        "from_pretrained folder": lambda base: MeCoQModel.from_pretrained(base / "private" / "model"),
        "from_pretrained weights": lambda base: MeCoQModel.from_pretrained(base / "weights_model"),
        "load_codebooks": lambda base: load_codebooks(base / "codebooks.safetensors"),
        "CodeIndex.load": lambda base: CodeIndex.load(base / "index.safetensors"),
        "mecoq search": search,
        "SplitDefinition.read": lambda base: SplitDefinition.read(base / "splits.json"),
    }

    def run_cases(base):
        results = {}
        for name, case in CASES.items():
            try:
                value = case(base)
                results[name] = value if name == "mecoq search" else None
            except Exception as error:
                results[name] = [type(error).__name__, str(error)]
        return results

    results = {"readable": run_cases(root / "readable")}  # also imports every module the cases need
    if os.geteuid() == 0:  # root reads everything: become nobody (the interpreter may be under /root)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    results["uid"] = os.geteuid()
    results["locked"] = run_cases(root / "locked")
    print("RESULTS " + json.dumps(results))
    """
)


def _save_folders(base: Path, model: MeCoQModel) -> None:
    for name in ("weights_model", "config_model", "private/model", "model"):
        model.save_pretrained(base / name)
    CodeIndex(model.normalized_codebooks()).save(base / "index.safetensors")
    shutil.copy(base / "model" / "codebooks.safetensors", base / "codebooks.safetensors")
    definition = SplitDefinition(source="fashion-mnist", limit=40, num_query=5, num_validation=5)
    definition.save(definition.build(), base)


@pytest.fixture(scope="module")
def denied_reads():
    """Run every read case as a user that may not read the files: once on readable copies, then locked."""
    root = Path(tempfile.mkdtemp(prefix="mecoq-permissions-"))
    root.chmod(0o755)  # the unprivileged child must reach it (pytest's tmp_path is private to root)
    try:
        model = tiny_model()
        for base in (root / "readable", root / "locked"):
            _save_folders(base, model)
        index = CodeIndex(model.normalized_codebooks())
        index.add(model.encode(torch.randn(4, 3, 32, 32)))
        index.save(root / "readable" / "index.safetensors")
        load_fashion_mnist("test", limit=1)[0]["image"].save(root / "readable" / "query.png")
        locked = root / "locked"
        for path in ("weights_model/model.safetensors", "config_model/config.json", "private",
                     "codebooks.safetensors", "index.safetensors", "splits.json"):  # fmt: skip
            (locked / path).chmod(0)
        for path in root.rglob("*"):  # everything else readable by all (the saves followed our umask)
            if path.stat().st_mode & 0o777 and not path.is_symlink():
                path.chmod(0o777 if path.is_dir() else 0o666)
        (root / "home").mkdir(mode=0o777)
        (root / "home").chmod(0o777)
        env = {
            **os.environ,
            "HOME": str(root / "home"),
            "HF_HOME": str(root / "home" / "hf"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, env=env, timeout=600
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
        assert result.returncode == 0 and lines, result.stderr[-4000:]
        return json.loads(lines[-1].removeprefix("RESULTS "))
    finally:
        for path in [root, *root.rglob("*")]:
            if not path.is_symlink():
                path.chmod(stat.S_IRWXU | stat.S_IMODE(path.stat().st_mode))
        shutil.rmtree(root)


def test_the_cases_work_on_readable_files_and_the_child_cannot_read_the_locked_ones(denied_reads):
    assert denied_reads["uid"] != 0
    readable = denied_reads["readable"]
    assert readable.pop("load_model missing")[0] == "FileNotFoundError"
    assert readable.pop("mecoq search")[0] == 0
    assert readable == dict.fromkeys(readable)  # every other case succeeded


@pytest.mark.parametrize(
    "case, path",
    [
        ("load_model weights", "weights_model/model.safetensors"),
        ("load_model config", "config_model/config.json"),
        ("load_model folder", "private/model"),
        ("from_pretrained folder", "private/model"),
        ("from_pretrained weights", "weights_model/model.safetensors"),
        ("load_codebooks", "codebooks.safetensors"),
        ("CodeIndex.load", "index.safetensors"),
        ("SplitDefinition.read", "splits.json"),
    ],
)
def test_an_unreadable_file_or_folder_is_reported_as_permission_denied(denied_reads, case, path):
    kind, message = denied_reads["locked"][case]
    assert kind == "PermissionError", message
    assert "permission denied" in message and path in message and "does not exist" not in message


def test_mecoq_search_says_permission_denied_for_an_unreadable_index(denied_reads):
    code, stderr = denied_reads["locked"]["mecoq search"]
    assert code == 2 and "permission denied" in stderr and "index.safetensors" in stderr, stderr
    assert "No such file" not in stderr


def test_a_missing_model_folder_is_still_reported_as_missing(denied_reads):
    kind, message = denied_reads["locked"]["load_model missing"]
    assert kind == "FileNotFoundError" and "does not exist" in message

"""Bad image folders through the command line (issue: reliability, items 3, 4 and the folder cases of 8).

Every command that reads images takes `--on-bad-image {raise,skip}` and lists what it skipped; folders the
`datasets` image-folder loader cannot label or store are explained in terms of files and flags. Real
Fashion-MNIST images saved as PNG files, from a scratch folder.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mecoq_hf import MeCoQConfig, MeCoQModel, cli
from mecoq_hf.cli import build_parser
from mecoq_hf.cli.train import settings_from_flags
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.retrieval.index import CodeIndex

MODEL = dict(backbone="test_efficientnet", backbone_weights=None, image_size=32, embedding_dim=16,
             num_codebooks=2, codebook_size=256)  # fmt: skip
TRAIN_CONFIG = {
    "model": MODEL,
    "training": {"num_epochs": 1, "batch_size": 16, "report_to": []},
    "data": {"num_query": 4, "num_validation": 4, "num_train": 16, "seed": 0},
}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def save_images(folder: Path, count: int, classes: tuple[str, ...] = ("shirt", "shoe")) -> None:
    for number, image in enumerate(load_fashion_mnist("test", limit=count)["image"]):
        target = folder / classes[number % len(classes)] if classes else folder
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / f"{number:03d}.png")


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    warnings.simplefilter("ignore")
    MeCoQModel(MeCoQConfig(**MODEL)).save_pretrained(tmp_path / "model")
    (tmp_path / "train.json").write_text(json.dumps(TRAIN_CONFIG))
    return tmp_path


@pytest.fixture
def bad_folder(scratch) -> tuple[Path, list[Path]]:
    """30 readable images in two classes, a truncated PNG and a text file named like a JPEG."""
    folder = scratch / "photos"
    save_images(folder, 30)
    truncated, not_an_image = folder / "shoe" / "truncated.png", folder / "shirt" / "notes.jpg"
    truncated.write_bytes((folder / "shoe" / "001.png").read_bytes()[:90])
    not_an_image.write_text("not an image")
    return folder, [not_an_image, truncated]


@pytest.mark.parametrize("command", [["encode"], ["index", "build"]])
def test_encoding_commands_raise_on_or_skip_bad_images(scratch, bad_folder, capsys, command):
    folder, bad = bad_folder
    argv = [*command, "model", "--dataset", str(folder), "--output", "out.safetensors", "--no-progress"]
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and "2 of 32 images cannot be read" in err
    assert all(str(path) in err for path in bad) and "--on-bad-image skip" in err
    assert not (scratch / "out.safetensors").exists()

    status, out, _ = run_cli([*argv, "--on-bad-image", "skip"], capsys)
    assert status == 0
    report = out[out.index("Skipped 2 unreadable image(s) (--on-bad-image skip):") :].splitlines()[1:3]
    assert [line.split("Cannot read image ")[1].split(" (row")[0] for line in report] == [str(p) for p in bad]
    if command == ["encode"]:
        assert "Encoded 30 images" in out and load_file("out.safetensors")["codes"].shape == (30, 2)
    else:
        sidecar = CodeIndex.load_with_sidecar("out.safetensors")[1]
        assert len(sidecar.ids) == 30 and not {str(p) for p in bad} & set(sidecar.paths)
        assert sidecar.data["on_bad_image"] == "skip"  # a reload for `mecoq search --grid` skips them too


def test_train_skips_bad_images_and_records_them(scratch, bad_folder, capsys):
    folder, bad = bad_folder
    argv = [
        "train",
        "--config",
        "train.json",
        "--dataset",
        str(folder),
        "--output-dir",
        "run",
        "--no-progress",
    ]
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and "--on-bad-image skip" in err
    status, out, _ = run_cli([*argv, "--on-bad-image", "skip"], capsys)
    assert status == 0 and "Skipped 2 unreadable image(s)" in out and "Trained model saved" in out
    record = json.loads((scratch / "run" / "splits.json").read_text())
    assert record["definition"]["on_bad_image"] == "skip" and record["sizes"]["database"] == 22
    assert [line.split(" (row")[0] for line in record["skipped_images"]] == [
        f"Cannot read image {path}" for path in bad
    ]
    status, out, _ = run_cli(["evaluate", "run", "--no-progress", "--map-k", "10"], capsys)
    assert status == 0 and "4 queries vs 22 database items" in out  # the recorded splits rebuild


def test_the_training_setting_and_the_flag_are_one_choice(scratch):
    def settings(*flags: str):
        argv = ["train", "--config", "train.json", "--dataset", "photos", "--output-dir", "run", *flags]
        return settings_from_flags(build_parser().parse_args(argv))

    _, training, data = settings("--set", "training.on_bad_image=skip")  # read before the data is loaded
    assert training.on_bad_image == data.on_bad_image == "skip"
    _, training, data = settings("--on-bad-image", "skip")
    assert training.on_bad_image == data.on_bad_image == "skip"
    with pytest.raises(ValueError, match="training.on_bad_image and data.on_bad_image differ"):
        settings("--on-bad-image", "skip", "--set", "training.on_bad_image=raise")
    assert build_parser().parse_args(["evaluate", "run", "--on-bad-image", "skip"]).on_bad_image == "skip"


@pytest.mark.parametrize("command", ["train", "encode"])
def test_a_file_name_that_is_not_utf8_is_named(scratch, capsys, command):
    folder = scratch / "archive"
    save_images(folder, 12)
    latin1 = os.fsencode(folder / "shoe") + b"/caf\xe9.png"  # "café.png" written by a Latin-1 system
    with open(latin1, "wb") as file:
        file.write((folder / "shoe" / "001.png").read_bytes())
    argv = (
        ["train", "--config", "train.json", "--dataset", str(folder), "--output-dir", "run"]
        if command == "train"
        else ["encode", "model", "--dataset", str(folder), "--output", "codes.safetensors"]
    )
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and "Traceback" not in err and "DatasetGenerationError" not in err
    assert f"{folder}/shoe/caf\\xe9.png" in err and "not valid UTF-8" in err
    assert "Rename them to UTF-8 names" in err and "convmv" in err


def test_a_one_class_folder_says_why_it_has_no_labels(scratch, capsys):
    save_images(scratch / "only_shoes", 12, classes=("shoe",))
    status, _, err = run_cli(
        ["encode", "model", "--dataset", "only_shoes", "--output", "c.safetensors"], capsys
    )
    assert status == 2
    assert "has only one class folder ('shoe'), so its images have no labels" in err
    assert "two or more class folders" in err and "--label-column none" in err
    status, _, _ = run_cli(["encode", "model", "--dataset", "only_shoes", "--output", "c.safetensors",
                            "--label-column", "none", "--no-progress"], capsys)  # fmt: skip
    assert status == 0 and "labels" not in load_file("c.safetensors")


def test_unlabelled_images_with_a_validation_split_suggest_num_validation_0(scratch, capsys):
    save_images(scratch / "flat", 40, classes=())
    argv = ["train", "--config", "train.json", "--dataset", "flat", "--label-column", "none", "--output-dir",
            "run", "--no-progress"]  # fmt: skip
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and "flat is unlabelled, but 4 validation queries were asked for" in err
    assert "--num-validation 0" in err
    status, out, _ = run_cli([*argv, "--num-validation", "0"], capsys)
    assert status == 0 and "the last model is kept" in out
    assert torch.isfinite(MeCoQModel.from_pretrained(scratch / "run").projection.weight).all()

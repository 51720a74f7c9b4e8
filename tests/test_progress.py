"""Phase progress (`mecoq_hf.progress`): the phases on their own, then what `mecoq train` shows.

The training runs use real Fashion-MNIST images and the tiny real `test_efficientnet` backbone (about 10 s
each on two CPU cores). With progress on, every phase has one tqdm bar (tqdm draws it even when stderr is not
a terminal, as here); with `--no-progress`, every phase prints one line when it ends. transformers' own bars
("Writing model shards" at each saved checkpoint, "Loading weights" when the best model is reloaded) never
show.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from tiny_runs import tiny_run_config

from mecoq_hf import cli
from mecoq_hf.progress import format_duration, phase, show_mode

TRAIN_CONFIG = tiny_run_config(
    training={"num_epochs": 2, "cached_views": 3, "checkpoint_every_steps": 1}, split="test"
)
TRANSFORMERS_BARS = ("Writing model shards", "Loading weights")
BAR = re.compile(r"\d+%\|")  # tqdm's "100%|█████|"


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "progress.yaml"
    path.write_text(TRAIN_CONFIG)
    return path


def train(config_file: Path, output_dir: Path, capsys, *flags: str) -> tuple[str, str]:
    """`mecoq train` in this process; its (stdout, stderr), tqdm's carriage returns read as line ends."""
    warnings.simplefilter("ignore")
    status = cli.main(["train", "--config", str(config_file), "--output-dir", str(output_dir), *flags])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out, captured.err.replace("\r", "\n")


def final_bar(stderr: str, name: str) -> str:
    """The last state of the bar `name` in the captured stderr."""
    states = [line for line in stderr.splitlines() if line.startswith(f"{name}:") and BAR.search(line)]
    assert states, f"no {name!r} bar in:\n{stderr}"
    return states[-1]


# phases on their own


def test_a_line_phase_prints_one_line_when_it_ends(capsys):
    with phase("caching views", 6, show="line", summary="2 views x 3 images") as progress:
        for _ in range(6):
            progress.update()
    captured = capsys.readouterr()
    assert re.fullmatch(r"caching views: 2 views x 3 images in 0\.\d s \(\d+ images/s\)\n", captured.out)
    assert captured.err == ""


def test_a_bar_phase_draws_one_bar_and_nested_phases_of_its_unit_count_into_it(capsys):
    with phase("caching views", 6) as views:
        for _ in range(3):
            with phase("embed dataset", 2) as inner:  # as `encode_dataset` inside `compute_view_features`
                inner.update(2)
    captured = capsys.readouterr()
    assert views.count == 6 and captured.out == ""
    assert "6/6" in final_bar(captured.err.replace("\r", "\n"), "caching views")
    assert "embed dataset" not in captured.err


def test_a_phase_of_another_unit_inside_has_its_own_bar_and_the_writes_keep_the_bars(capsys):
    with phase("training", 2, unit="steps") as training:
        training.update()
        with phase("validation", 5) as validation:  # images, during training (steps)
            validation.update(5)
        training.write("epoch 0: validation mAP@100 0.5000")
        training.update()
    captured = capsys.readouterr()
    assert captured.out == "epoch 0: validation mAP@100 0.5000\n"
    err = captured.err.replace("\r", "\n")
    assert "2/2" in final_bar(err, "training")
    assert "/5 " in final_bar(err, "validation")  # its own bar, cleared when it ends (leave=False)
    assert (training.count, validation.count) == (2, 5)  # the images were not counted as steps


def test_off_shows_nothing_a_failed_phase_prints_no_line_and_bad_modes_are_refused(capsys):
    with phase("training", 3, unit="steps", show="off") as progress:
        progress.update(3)
        progress.write("hidden")
    with pytest.raises(KeyError), phase("caching views", 4, show="line"):
        raise KeyError("interrupted")
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ValueError, match=r"show must be one of \('bar', 'line', 'off'\), got 'quiet'"):
        phase("training", show="quiet")


def test_show_mode_and_durations():
    assert (show_mode(True), show_mode(False), show_mode(True, main_process=False)) == ("bar", "line", "off")
    assert [format_duration(s) for s in (0.42, 41.3, 312, 7530)] == [
        "0.4 s",
        "41 s",
        "5 min 12 s",
        "2 h 05 min",
    ]


# what `mecoq train` shows


@pytest.mark.slow
def test_train_with_progress_shows_one_bar_per_phase_and_no_transformers_bars(config_file, tmp_path, capsys):
    out, err = train(config_file, tmp_path / "run", capsys)
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) >= 1  # checkpoints were saved
    for bar in TRANSFORMERS_BARS:
        assert bar not in err
    assert "192/192" in final_bar(err, "caching views")  # 3 views x 64 images, in one bar
    assert "380/380" in final_bar(err, "validation features")  # 20 queries + 360 database images
    training = final_bar(err, "training")
    assert "4/4" in training and "loss=" in training  # 2 epochs x 2 steps
    assert "embed dataset" not in err  # the passes over the images count into their phase's bar
    phases = {line.split(":")[0] for line in err.splitlines() if BAR.search(line)}
    # mecoq train's default trains the backbone's last group: each validation runs it over the cached trunk
    # outputs, in a bar of its own
    assert phases == {"caching views", "validation features", "training", "validation"}
    assert not re.search(r"^(caching views|validation features|training): ", out, re.MULTILINE)
    assert re.search(r"^epoch 1: validation mAP@100 0\.\d{4} \(best .*\) in \d", out, re.MULTILINE)


@pytest.mark.slow
def test_train_without_progress_prints_one_line_per_phase_and_no_bar(config_file, tmp_path, capsys):
    out, err = train(config_file, tmp_path / "run", capsys, "--no-progress")
    assert not BAR.search(err) and "it/s" not in err
    for bar in TRANSFORMERS_BARS:
        assert bar not in err
    lines = out.splitlines()
    for pattern in (
        r"caching views: 3 views x 64 images in [\d.]+ s \(\d+ images/s\)",
        r"validation features: 20 queries \+ 360 database images in [\d.]+ s \(\d+ images/s\)",
        r"training: 4 steps in [\d.]+ s \([\d.]+ steps/s\)",
        r"epoch 0: validation mAP@100 0\.\d{4} \(best 0\.\d{4} at epoch 0\) in [\d.]+ s",
        r"epoch 1: validation mAP@100 0\.\d{4} \(best 0\.\d{4} at epoch \d\) in [\d.]+ s",
    ):
        assert len([line for line in lines if re.fullmatch(pattern, line)]) == 1, (pattern, out)
    order = [
        line.split(":")[0]
        for line in lines
        if re.match(r"(caching views|validation features|training):", line)
    ]
    assert order == ["caching views", "validation features", "training"]


@pytest.mark.slow
def test_train_with_a_trainable_backbone_shows_a_validation_bar(config_file, tmp_path, capsys):
    flags = ["--epochs", "1", "--set", "training.cached_views=0", "--set", "model.backbone_trainable=all"]
    out, err = train(config_file, tmp_path / "run", capsys, *flags)
    assert "/380 " in final_bar(err, "validation")  # the backbone runs over the validation images
    assert "2/2" in final_bar(err, "training")
    for bar in (*TRANSFORMERS_BARS, "caching views", "validation features", "embed dataset"):
        assert bar not in err
    assert re.search(r"^epoch 0: validation mAP@100 0\.\d{4}", out, re.MULTILINE)

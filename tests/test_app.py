"""The search page (`mecoq app`) and its Space (`mecoq push-app`), on a real tiny model and Fashion-MNIST.

One small model is trained once per module with `mecoq train` and indexed with `mecoq index build`; the page's
answers are compared with `mecoq search` for the same image. The page is served by gradio on a free
127.0.0.1 port and asked through real HTTP (gradio_client) and, in the slow test, through headless Chromium
driven by selenium. The Space is pushed with the real huggingface_hub client to tests/hub_server.py, then its
`app.py` is run from the downloaded files.

`MECOQ_APP_SCREENSHOT=docs/images/search_page.png pytest tests/test_app.py -k browser` also writes the browser
test's screenshot, reduced for the README, to that path.
"""

from __future__ import annotations

import io
import json
import os
import re
import runpy
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import tiny_run_config

from mecoq_hf import MeCoQModel, cli
from mecoq_hf.data.sources import load_fashion_mnist
from mecoq_hf.retrieval.index import CodeIndex

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = tiny_run_config()
INDEXED = 200  # the first 200 Fashion-MNIST test images
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Without these Chromium reaches for the network (component updates, sync, field trials) at start.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


# fixtures: a trained model, its index, a query image


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A model folder written by `mecoq train` (about 10 s), with `mecoq evaluate --output` metrics in it."""
    warnings.simplefilter("ignore")
    root = tmp_path_factory.mktemp("app_run")
    (root / "tiny.yaml").write_text(TINY_CONFIG)
    model = root / "model"
    assert (
        cli.main(["train", "--config", str(root / "tiny.yaml"), "--output-dir", str(model), "--no-progress"])
        == 0
    )
    assert cli.main(["evaluate", str(model), "--map-k", "100", "--output", str(model / "metrics.json"),
                     "--no-progress"]) == 0  # fmt: skip
    return model


@pytest.fixture(scope="module")
def index_path(trained, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("app_index") / "index.safetensors"
    status = cli.main(["index", "build", str(trained), "--dataset", "fashion-mnist", "--split", "test",
                       "--limit", str(INDEXED), "--output", str(output), "--no-progress"])  # fmt: skip
    assert status == 0
    return output


@pytest.fixture(scope="module")
def query_png(tmp_path_factory) -> Path:
    """A Fashion-MNIST training image (not in the index) as a PNG file, as a user would upload it."""
    path = tmp_path_factory.mktemp("app_query") / "query.png"
    load_fashion_mnist("train", limit=1)[0]["image"].save(path)
    return path


@pytest.fixture(scope="module")
def other_model(trained, tmp_path_factory) -> Path:
    """A model of the same architecture with other (freshly initialised) codebooks."""
    model = MeCoQModel.from_pretrained(trained)
    torch.manual_seed(1)
    fresh = MeCoQModel(model.config)
    assert not torch.allclose(fresh.normalized_codebooks(), model.normalized_codebooks())
    folder = tmp_path_factory.mktemp("other_model")
    fresh.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def not_an_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_upload") / "holiday.png"  # an image's name, text inside
    path.write_text("these are my notes, not a picture\n")
    return path


def cli_search(index: Path, image: Path, top_k: int, capsys, model: Path | None = None) -> list[tuple]:
    """(id, score, label) rows that `mecoq search` prints for `image`."""
    capsys.readouterr()
    argv = ["search", str(index), "--image", str(image), "--top-k", str(top_k)]
    assert cli.main(argv + (["--model", str(model)] if model else [])) == 0
    rows = re.findall(r"^\s+\d+\s+(\d+)\s+(-?\d+\.\d+)\s+(\S.*?)$", capsys.readouterr().out, re.MULTILINE)
    assert len(rows) == top_k
    return [(int(item), float(score), label) for item, score, label in rows]


def table_rows(table: str) -> list[tuple]:
    """(id, score, label) rows of the page's results table (Markdown)."""
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (-?\d+\.\d+) \| (.+?) \|$", table, re.MULTILINE)
    return [(int(item), float(score), label) for _, item, score, label in rows]


def approx_rows(rows: list[tuple]) -> list[tuple]:
    return [(item, pytest.approx(score, abs=1e-4), label) for item, score, label in rows]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served(request):
    """Serve gr.Blocks on a free 127.0.0.1 port; yields a function blocks -> URL, closes them afterwards."""
    from mecoq_hf.app.page import launch_page

    opened = []

    def serve(blocks) -> str:
        url = launch_page(blocks, "127.0.0.1", free_port(), block=False)
        opened.append(blocks)
        return url

    yield serve
    for blocks in opened:
        blocks.close()


# the page's answers, without a browser


def test_the_page_ranks_like_mecoq_search(trained, index_path, query_png, capsys):
    from mecoq_hf.app.page import build_page

    page = build_page(trained, index_path).search_page
    answer = page.answer(str(query_png), 7)
    expected = cli_search(index_path, query_png, 7, capsys)
    assert table_rows(answer.table) == approx_rows(expected)
    assert len(answer.gallery) == 7
    first_image, first_caption = answer.gallery[0]
    assert first_caption.startswith(f"#1 {expected[0][2]} · ") and first_caption.endswith(
        f"id {expected[0][0]}"
    )
    database = load_fashion_mnist("test", limit=INDEXED)
    assert np.array_equal(np.asarray(first_image), np.asarray(database[expected[0][0]]["image"]))
    assert answer.status.startswith(f"Top 7 of {INDEXED} images (asymmetric scores")
    # k is clipped to what the index holds and to at least one result
    assert len(table_rows(page.answer(str(query_png), 0).table)) == 1
    assert len(table_rows(page.answer(str(query_png), 10_000).table)) == min(INDEXED, 100)


def test_the_faiss_backend_serves_the_same_scores(trained, index_path, query_png):
    from mecoq_hf.app.page import build_page

    native = build_page(trained, index_path, examples=0).search_page.answer(str(query_png), 10)
    faiss = build_page(trained, index_path, examples=0, backend="faiss").search_page.answer(
        str(query_png), 10
    )
    scores = [score for _, score, _ in table_rows(faiss.table)]
    assert scores == [pytest.approx(score, abs=1e-4) for _, score, _ in table_rows(native.table)]
    assert len(faiss.gallery) == 10


def test_the_headline_states_bits_bytes_and_the_test_map(trained, index_path):
    from mecoq_hf.app.page import headline_text
    from mecoq_hf.app.search import headline_numbers, open_search

    engine = open_search(trained, index_path)
    headline = headline_numbers(trained, engine.model)
    test_map = json.loads((trained / "metrics.json").read_text())["metrics"]["map@100"]
    validation_map = json.loads((trained / "run_record.json").read_text())["metrics"]["best_validation_map"]
    assert (headline.bits, headline.bytes_per_image) == (16, 2)
    assert [(split, value) for _, _, split, value in headline.results] == [
        ("query", round(test_map, 4)),
        ("validation", round(validation_map, 4)),
    ]
    text = headline_text(headline)
    assert "**16 bits** per image (2 bytes per image" in text
    assert f"mAP@100 {round(test_map, 4):.4f}** (fashion-mnist, query split)" in text


def test_an_upload_that_is_not_an_image_gets_a_message(trained, index_path, not_an_image, query_png):
    from mecoq_hf.app.page import build_page

    page = build_page(trained, index_path).search_page
    answer = page.answer({"path": str(not_an_image), "orig_name": "holiday.png"}, 5)
    assert answer.gallery == [] and answer.table == ""
    assert answer.status.startswith("**Problem:** holiday.png is not an image that can be read (")
    assert "Upload a PNG, JPEG, WebP or BMP image." in answer.status
    assert len(page.answer(str(query_png), 5).gallery) == 5  # the next request is answered as usual


def test_an_index_of_other_codebooks_is_explained_in_the_page(other_model, index_path, query_png, capsys):
    from mecoq_hf.app.page import build_page

    page = build_page(other_model, index_path).search_page
    assert page.engine is None
    answer = page.answer(str(query_png), 5)
    assert answer.gallery == [] and answer.table == ""
    assert f"{index_path} was built with other codebooks than the model {other_model}" in answer.status
    assert "mecoq index build MODEL_DIR" in answer.status
    # `mecoq search` refuses the same pair
    assert cli.main(["search", str(index_path), "--model", str(other_model), "--image", str(query_png)]) == 2
    assert "was built with other codebooks than the model" in capsys.readouterr().err


def test_missing_images_are_explained_and_results_still_listed(
    trained, index_path, query_png, tmp_path, capsys
):
    from mecoq_hf.app.page import build_page

    gone = tmp_path / "moved-away"
    page = build_page(trained, index_path, images=str(gone), examples=4).search_page
    answer = page.answer(str(query_png), 6)
    assert answer.gallery == []
    assert table_rows(answer.table) == approx_rows(cli_search(index_path, query_png, 6, capsys))
    assert f"The indexed images cannot be loaded from '{gone}'" in answer.status
    assert "fix --images SOURCE" in answer.status
    assert page.engine.examples(4) == []

    # an image source that lost some of the indexed ids (here it holds the first 150 of the 200)
    shorter = tmp_path / "shorter.safetensors"
    index, sidecar = CodeIndex.load_with_sidecar(index_path)
    sidecar.data["limit"] = 150
    index.save(shorter, sidecar=sidecar)
    page = build_page(trained, shorter, examples=0).search_page
    assert page.engine.image_problem.startswith("50 of the 200 indexed ids (e.g. [150, 151, 152]) are not in")
    answer = page.answer(str(query_png), 100)
    rows = table_rows(answer.table)
    assert len(rows) == 100 and len(answer.gallery) == sum(item < 150 for item, _, _ in rows)
    assert "are not in the image source any more" in answer.status

    # an index saved without a description of its items: no record of the images at all
    bare = tmp_path / "bare.safetensors"
    CodeIndex.load(index_path).save(bare)
    answer = build_page(trained, bare).search_page.answer(str(query_png), 3)
    assert f"{bare} does not record where its images are: pass --images SOURCE" in answer.status
    assert [label for _, _, label in table_rows(answer.table)] == ["-", "-", "-"]
    # ... and with --images the page shows them again
    answer = build_page(trained, bare, images="fashion-mnist").search_page.answer(str(query_png), 3)
    assert len(answer.gallery) == 3


def test_the_server_keeps_serving_after_bad_requests(trained, index_path, query_png, not_an_image, served):
    from gradio_client import Client, handle_file

    from mecoq_hf.app.page import build_page

    url = served(build_page(trained, index_path))
    client = Client(url, verbose=False)
    gallery, table, status = client.predict(handle_file(str(not_an_image)), 5, api_name="/search")
    assert gallery == [] and "holiday.png is not an image that can be read" in status
    gallery, table, status = client.predict(None, 5, api_name="/search")
    assert gallery == [] and "Drop an image" in status
    gallery, table, status = client.predict(handle_file(str(query_png)), 4, api_name="/search")
    assert len(gallery) == 4 and len(table_rows(table)) == 4 and status.startswith("Top 4 of")


# the command line


def test_mecoq_app_without_gradio_says_how_to_install_it(trained, index_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "mecoq_hf.app.page", raising=False)
    assert cli.main(["app", str(trained), "--index", str(index_path)]) == 2
    assert 'the search page needs gradio: pip install "mecoq-hf[app]"' in capsys.readouterr().err


def test_the_package_and_the_space_writer_do_not_import_gradio():
    code = (
        "import sys, mecoq_hf, mecoq_hf.cli, mecoq_hf.app, mecoq_hf.app.search, mecoq_hf.app.space\n"
        "from mecoq_hf.models.mecoq import modeling_mecoq\n"
        "assert 'gradio' not in sys.modules, 'gradio was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_mecoq_app_errors_name_the_problem(trained, tmp_path, capsys):
    assert cli.main(["app", str(trained), "--index", str(tmp_path / "nowhere.safetensors")]) == 2
    assert "Index file" in capsys.readouterr().err
    assert cli.main(["app", str(trained), "--index", str(tmp_path / "x"), "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535, got 70000" in capsys.readouterr().err


# the Space


def test_write_space_writes_a_gradio_space_for_the_model_repo(index_path, tmp_path, capsys):
    from huggingface_hub import SpaceCard

    folder = tmp_path / "space"
    argv = ["push-app", "local-user/tiny-mecoq", "--index", str(index_path), "--output-dir", str(folder)]
    assert cli.main(argv + ["--images", "zalando-datasets/fashion_mnist"]) == 0
    assert "Space files written to" in capsys.readouterr().out
    names = sorted(path.name for path in folder.iterdir())
    assert names == ["README.md", "app.py", "index.safetensors", "requirements.txt"]
    card = SpaceCard.load(folder / "README.md")
    assert (card.data.sdk, card.data.app_file, card.data.models) == (
        "gradio",
        "app.py",
        ["local-user/tiny-mecoq"],
    )
    assert card.data.sdk_version == __import__("gradio").__version__
    app = (folder / "app.py").read_text()
    compile(app, "app.py", "exec")
    assert "build_page('local-user/tiny-mecoq', HERE / 'index.safetensors', " in app
    assert "images='zalando-datasets/fashion_mnist'" in app
    copy, sidecar = CodeIndex.load_with_sidecar(folder / "index.safetensors")  # one file: codes + description
    assert sidecar.model == "local-user/tiny-mecoq" and sidecar.paths is None
    original = CodeIndex.load(index_path)
    assert torch.equal(copy.codes, original.codes) and torch.equal(copy.ids, original.ids)
    # without --images / --bundle-images the Space would look for the images on this machine: a warning
    assert cli.main(argv[:-2] + ["--output-dir", str(tmp_path / "space2")]) == 0
    assert "images come from 'fashion-mnist', which a Space does not have" in capsys.readouterr().err
    # a local folder is not a repo a Space can link
    assert cli.main(["push-app", str(tmp_path), "--index", str(index_path), "--output-dir", str(folder)]) == 2
    assert "push it with `mecoq push MODEL_DIR REPO_ID` first" in capsys.readouterr().err


def test_push_app_publishes_a_space_whose_app_searches(local_hub, trained, index_path, other_model, query_png,
                                                       tmp_path, capsys):  # fmt: skip
    from huggingface_hub import HfApi, SpaceCard, snapshot_download

    from mecoq_hf.app.search import headline_numbers
    from mecoq_hf.hub import push_model_to_hub

    token = "hf_test_token"
    push_model_to_hub(trained, "local-user/tiny-mecoq", run_record=trained / "run_record.json", token=token)
    push_model_to_hub(other_model, "local-user/other-mecoq", token=token)
    # an index of another model is refused before anything is uploaded
    argv = ["push-app", "local-user/other-mecoq", "local-user/wrong-search", "--index", str(index_path)]
    assert cli.main(argv + ["--token", token]) == 2
    assert "was built with other codebooks than the model local-user/other-mecoq" in capsys.readouterr().err
    assert not HfApi().repo_exists("local-user/wrong-search", repo_type="space", token=token)

    argv = ["push-app", "local-user/tiny-mecoq", "local-user/tiny-search", "--index", str(index_path)]
    assert cli.main(argv + ["--bundle-images", "--token", token]) == 0
    assert "Pushed the search page of local-user/tiny-mecoq to the Space local-user/tiny-search" in (
        capsys.readouterr().out
    )
    files = HfApi().list_repo_files("local-user/tiny-search", repo_type="space", token=token)
    assert {"app.py", "README.md", "requirements.txt", "index.safetensors"} <= set(files)
    assert any(name.startswith("images/") and name.endswith(".arrow") for name in files)
    space = Path(snapshot_download("local-user/tiny-search", repo_type="space", token=token,
                                   local_dir=tmp_path / "space"))  # fmt: skip
    card = SpaceCard.load(space / "README.md")
    assert (card.data.sdk, card.data.app_file, card.data.models) == (
        "gradio",
        "app.py",
        ["local-user/tiny-mecoq"],
    )
    assert "16-bit MeCoQ codes" in card.text

    # the Space's app.py, run from the downloaded files: the model comes from the Hub, the images from images/
    demo = runpy.run_path(str(space / "app.py"), run_name="space_app")["demo"]
    answer = demo.search_page.answer(str(query_png), 5)
    expected = cli_search(index_path, query_png, 5, capsys, model=trained)
    assert table_rows(answer.table) == approx_rows(expected)
    assert len(answer.gallery) == 5 and demo.search_page.engine.image_problem is None
    # the headline of a Hub model comes from its model card
    headline = headline_numbers("local-user/tiny-mecoq", demo.search_page.engine.model)
    validation_map = json.loads((trained / "run_record.json").read_text())["metrics"]["best_validation_map"]
    assert [(split, value) for _, _, split, value in headline.results] == [
        ("validation", round(validation_map, 4))
    ]


# the page in a real browser


@pytest.fixture
def mecoq_app():
    """`mecoq app ARGS --port <free port>` as a user starts it, in a child process: start(*args) -> URL."""
    children, readers = [], []

    def start(*args: str) -> str:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        }
        command = [sys.executable, "-m", "mecoq_hf.cli", "app", *args, "--port", str(free_port())]
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        children.append(child)
        lines = []
        for line in child.stdout:  # until the command says where it serves (or ends)
            lines.append(line)
            found = re.search(r"^Search page of .+ on (http://127\.0\.0\.1:\d+/) \(Ctrl\+C stops it\)$", line)
            if found:  # keep reading what it prints, so that it never blocks on a full pipe
                readers.append(threading.Thread(target=child.stdout.read, daemon=True))
                readers[-1].start()
                return found.group(1)
        raise AssertionError(
            f"mecoq app ended without serving (status {child.wait()}): {''.join(lines)[-3000:]}"
        )

    yield start
    for child in children:
        child.terminate()
        child.wait(timeout=60)
    for reader in readers:
        reader.join(timeout=30)
    for child in children:
        child.stdout.close()


def chromium_driver(downloads: Path):
    """Headless Chromium under selenium with a fresh profile and its network log switched on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={downloads}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def requested_urls(driver) -> set[str]:
    """Every URL the page asked for (documents, scripts, fonts, images, websockets, fetches)."""
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.add(message["params"]["url"])
    return urls


def wait_for_status(driver, prefix: str, timeout: float = 60.0) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.ID, "status").text.startswith(prefix))
    return driver.find_element(By.ID, "status").text


def reduced_png(png: bytes, width: int = 960, colors: int = 64) -> bytes:
    """A screenshot made small for the README: scaled to `width` and reduced to a palette."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.quantize(colors).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                    reason="needs Debian's chromium and chromium-driver (make install)")  # fmt: skip
def test_the_page_in_a_browser(mecoq_app, trained, index_path, query_png, not_an_image, capsys, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url = mecoq_app(str(trained), "--index", str(index_path))
    expected = cli_search(index_path, query_png, 6, capsys)
    started = time.perf_counter()
    driver = chromium_driver(Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)))
    try:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#query input[type=file]"))
        assert "16 bits" in driver.find_element(By.ID, "headline").text
        # k = 6, typed into the slider's number box
        number = driver.find_element(By.CSS_SELECTOR, "input[type=number]")
        number.send_keys(Keys.CONTROL, "a")
        number.send_keys("6", Keys.ENTER)
        # a text file named .png: a message, and the page goes on working
        driver.find_element(By.CSS_SELECTOR, "#query input[type=file]").send_keys(str(not_an_image))
        assert "holiday.png is not an image that can be read" in wait_for_status(driver, "Problem:")
        driver.find_element(By.CSS_SELECTOR, "#query button[aria-label='Remove Image']").click()
        wait_for_status(driver, "Drop an image")
        driver.find_element(By.CSS_SELECTOR, "#query input[type=file]").send_keys(str(query_png))
        assert wait_for_status(driver, "Top 6 of").startswith(f"Top 6 of {INDEXED} images")
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img")) == 6)
        captions = [
            image.get_attribute("alt") for image in driver.find_elements(By.CSS_SELECTOR, "#results img")
        ]
        assert len(captions) == 6 and captions[0].startswith(f"#1 {expected[0][2]} · ")
        rows = driver.find_elements(By.CSS_SELECTOR, "#results-table tbody tr")
        assert [row.text.split()[1] for row in rows] == [str(item) for item, _, _ in expected]
        time.sleep(0.5)  # let the thumbnails finish drawing
        png = driver.get_screenshot_as_png()
        urls = requested_urls(driver)
    finally:
        driver.quit()
    print(f"browser part: {time.perf_counter() - started:.1f} s")
    # nothing but the page's own server was asked for anything (no fonts, analytics or CDN)
    remote = sorted(
        u for u in urls if u.startswith(("http", "ws")) and not u.startswith((url, url.replace("http", "ws")))
    )
    assert remote == []
    # the screenshot shows a page, not a blank window: many shades, the gallery's dark thumbnails among them
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert shot.shape[0] >= 600 and shot.shape[1] >= 800
    assert shot.std() > 20 and len(np.unique(shot)) > 64 and (shot < 40).mean() > 0.02
    target = os.environ.get("MECOQ_APP_SCREENSHOT")
    if target:
        Path(target).write_bytes(reduced_png(png))

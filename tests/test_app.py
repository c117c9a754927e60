"""app.py, the Gradio demo, driven in a real browser: Debian's Chromium through Playwright.

The app runs as a user runs it (`python app.py`, the model from POKESPRITE_MODEL) on 127.0.0.1 and a free port.
The browser types a prompt, presses Generate and waits for the sprites; each sprite is downloaded from its
`src` and must be a PNG with the model's pixels for the seed. A screenshot goes into the test's folder, and into
docs/app_screenshot.png when POKESPRITE_SAVE_SCREENSHOT=1.

Needs: pip install playwright==1.65.2, apt-get install -y chromium (a browser downloaded by Playwright cannot
run here, so the system's is used).
"""

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_generate import MINILM, TINY, model_sprites, save_tiny_model

gr = pytest.importorskip("gradio", reason="the web demo needs gradio (see requirements)")

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# no GPU, no network side-channels (QUIC, component updates, sync, first-run pings): the page talks only to the app
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a small blue water turtle"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(url, proc, log, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"app.py did not answer at {url} within {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_decoder")
    return folder, save_tiny_model(folder, "decoder")


@pytest.fixture(scope="module")
def app_url(tiny_model, tmp_path_factory):
    """`python app.py` on 127.0.0.1:<free port>, the model from POKESPRITE_MODEL; stopped after the module."""
    work = tmp_path_factory.mktemp("app")
    log = work / "app.log"
    port = free_port()
    env = {**os.environ, "POKESPRITE_MODEL": str(tiny_model[0]), "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(work / "gradio"), "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO_ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_answering(url, proc, log)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Debian's Chromium is not at {CHROMIUM}: apt-get install -y chromium (or set CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is missing: pip install playwright==1.65.2")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url):
    """A page on the app that records every request it makes to a host other than the app's."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.outside_requests = []
    page.on("request", lambda r: None if r.url.startswith((app_url, "data:", "blob:")) else page.outside_requests.append(r.url))
    page.goto(app_url)
    yield page
    page.close()


def generate_in_browser(page, prompt, num_sprites=4):
    page.get_by_label("Description").fill(prompt)
    page.locator("#generate").click()
    page.wait_for_function(f"document.querySelectorAll('#sprites img').length == {num_sprites}", timeout=90_000)
    page.wait_for_function("document.querySelector('#attention img') !== null", timeout=90_000)


def download_png(page, src):
    response = page.request.get(src)
    assert response.ok, f"{src}: HTTP {response.status}"
    image = Image.open(io.BytesIO(response.body()))
    assert image.format == "PNG"
    image.load()
    return image


# in the browser


def test_typed_prompt_gives_the_models_sprites_as_pngs_and_nothing_is_fetched_from_outside(page, tiny_model, tmp_path):
    generate_in_browser(page, PROMPT)

    sources = page.locator("#sprites img").evaluate_all("images => images.map(image => image.src)")
    sprites = [download_png(page, src) for src in sources]
    assert [(s.mode, s.size) for s in sprites] == [("RGBA", (64, 64))] * 4
    expected = model_sprites(tiny_model[1], PROMPT, 4, seed=0)  # the app's defaults: 4 sprites, seed 0
    assert all(np.array_equal(np.asarray(s), e) for s, e in zip(sprites, expected))
    heatmaps = download_png(page, page.locator("#attention img").get_attribute("src"))
    assert heatmaps.width == 8 * (2 * 64 + 4)  # the sprite and the 7 tokens of the prompt, [CLS] and [SEP] included
    assert page.locator("#guidance").count() == 0  # a decoder model has no guidance scale

    page.screenshot(path=str(tmp_path / "app_screenshot.png"), full_page=True)
    if os.environ.get("POKESPRITE_SAVE_SCREENSHOT") == "1":
        shutil.copyfile(tmp_path / "app_screenshot.png", REPO_ROOT / "docs" / "app_screenshot.png")
    assert page.outside_requests == []


def test_choosing_a_word_shows_only_its_heatmap(page):
    generate_in_browser(page, PROMPT)
    all_words = page.locator("#attention img").get_attribute("src")

    page.locator("#word input").click()
    assert page.get_by_role("option").all_inner_texts()[1:] == [
        "[CLS]", "a", "small", "blue", "water", "turtle", "[SEP]"]
    page.get_by_role("option", name="turtle", exact=True).click()
    page.wait_for_function(f"document.querySelector('#attention img').src != {all_words!r}", timeout=60_000)

    figure = download_png(page, page.locator("#attention img").get_attribute("src"))
    assert figure.width == 2 * (4 * 64 + 4)  # the sprite and "turtle", drawn at scale 4


# without a browser


def test_guidance_scale_is_shown_only_for_diffusion_models():
    import app

    def guidance_visible(generator_type):
        torch.manual_seed(0)
        from modeling_pokesprite import PokeSpriteModel

        model = PokeSpriteModel.from_text_encoder(MINILM, generator_type=generator_type, **TINY).eval()
        demo = app.build_demo(model)
        (slider,) = [block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "guidance"]
        return slider.visible

    assert guidance_visible("diffusion") is True
    assert guidance_visible("decoder") is False


def test_empty_prompt_is_an_error_shown_in_the_page(tiny_model):
    import app

    demo = app.build_demo(tiny_model[1])
    (make_sprites,) = [f.fn for f in demo.fns.values() if f.name == "make_sprites"]
    with pytest.raises(gr.Error, match="Type a description"):
        make_sprites("   ", 4, 0, 3.0)

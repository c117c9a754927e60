"""app.py, the Gradio demo, driven in a real browser: Debian's Chromium through Playwright.

The app runs as a user runs it (`python app.py`, the model from POKESPRITE_MODEL) on 127.0.0.1 and a free port.
The browser types a prompt, presses Generate and waits for the sprites; each sprite is downloaded from its
`src` and must be a PNG with the model's pixels for the seed. A screenshot goes into the test's folder, and into
docs/app_screenshot.png when POKESPRITE_SAVE_SCREENSHOT=1.

Needs: pip install -r requirements-app.txt -r requirements-dev.txt, apt-get install -y chromium (a browser
downloaded by Playwright cannot run here, so the system's is used; the `browser` fixture is in conftest.py).
Without them the tests skip, and fail under CI=true.
"""

import contextlib
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

from conftest import require_module
from test_generate import MINILM, TINY, model_sprites, save_tiny_model

gr = require_module("gradio", "pip install -r requirements-app.txt")

REPO_ROOT = Path(__file__).resolve().parents[1]
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


@contextlib.contextmanager
def running_app(work, cwd=REPO_ROOT, args=(), env=None):
    """`python app.py *args` in `cwd` on 127.0.0.1:<free port> (as a Space runs it: host and port from
    GRADIO_SERVER_NAME/PORT), offline; yields its URL, and stops it on exit. Its output goes to work/app.log.
    `env` adds to the environment; a None value removes that variable."""
    log = work / "app.log"
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(work / "gradio"), "HF_HUB_OFFLINE": "1",
           "NO_PROXY": "127.0.0.1,localhost", **(env or {})}
    env = {name: value for name, value in env.items() if value is not None}  # None: leave that variable out
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "app.py", *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
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
def app_url(tiny_model, tmp_path_factory):
    """`python app.py` on 127.0.0.1:<free port>, the model from POKESPRITE_MODEL; stopped after the module."""
    work = tmp_path_factory.mktemp("app")
    with running_app(work, env={"POKESPRITE_MODEL": str(tiny_model[0])}) as url:
        yield url


def open_page(browser, url):
    """A page on the app at `url` that records every request it makes to a host other than the app's."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.outside_requests = []
    page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else page.outside_requests.append(r.url))
    page.goto(url)
    return page


@pytest.fixture
def page(browser, app_url):
    page = open_page(browser, app_url)
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


def handler(model):
    import app

    (make_sprites,) = [f.fn for f in app.build_demo(model).fns.values() if f.name == "make_sprites"]
    return make_sprites


# the prompt check is generate.py's (generate.check_prompt): the same rule and words as the command line


def test_description_without_tokens_is_an_error_shown_in_the_page(tiny_model):
    # str(gr.Error) is the repr of its message
    with pytest.raises(gr.Error, match=r"The description is empty once tokenized \(.*u200b.*u200d.* has no characters the "
                                       r"tokenizer reads\)\."):
        handler(tiny_model[1])("\u200b\u200d", 1, 0, 3.0)


def test_overlong_description_is_truncated_with_a_warning_giving_the_token_counts(tiny_model, monkeypatch):
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message, *args, **kwargs: warnings.append(message))
    prompt = "a small blue water turtle with a hard round shell that hides in lakes and sprays water at night"
    sprites = handler(tiny_model[1])(prompt, 1, 0, 3.0)[0]

    assert warnings == ["The description is 22 tokens long; the model reads the first 16 (config.max_text_length), "
                        "so it ignores: 'and sprays water at night'."]
    assert np.array_equal(np.asarray(sprites[0]), model_sprites(tiny_model[1], prompt, 1, seed=0)[0])


# resource limits: one request cannot starve or kill the demo (checked in the handler: an API client skips the page)


def test_overlong_prompt_is_refused_before_it_is_tokenized(tiny_model, monkeypatch):
    import app
    import generate

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the over-long prompt was tokenized")

    monkeypatch.setattr(generate, "count_tokens", no_tokenizing)  # what generate.check_prompt, app's check, calls
    make_sprites = handler(tiny_model[1])
    with pytest.raises(gr.Error, match=r"The description is 3,000,000 characters long; the demo takes at most 1,000"):
        make_sprites("a" * 3_000_000, 4, 0, 3.0)
    textbox = next(b for b in app.build_demo(tiny_model[1]).blocks.values() if getattr(b, "elem_id", None) == "prompt")
    assert textbox.max_length == app.MAX_PROMPT_CHARS == 1000  # the page itself stops typing there


@pytest.mark.parametrize("num", [0, 17, 64, 2.5, float("nan"), "4"])
def test_sprites_per_request_are_bounded(tiny_model, num):
    with pytest.raises(gr.Error, match=r"The number of sprites must be a whole number from 1 to 16"):
        handler(tiny_model[1])(PROMPT, num, 0, 3.0)


@pytest.mark.parametrize("seed", [1e30, 2**64, -1, 0.5, float("inf"), float("nan")])
def test_seed_outside_what_torch_takes_is_a_clear_error(tiny_model, seed):
    with pytest.raises(gr.Error, match=r"The seed must be a whole number from 0 to 18446744073709551615, got"):
        handler(tiny_model[1])(PROMPT, 1, seed, 3.0)


def test_largest_seed_is_accepted(tiny_model):
    sprites = handler(tiny_model[1])(PROMPT, 1, 2**64 - 1, 3.0)[0]
    expected = model_sprites(tiny_model[1], PROMPT, 1, seed=2**64 - 1)
    assert np.array_equal(np.asarray(sprites[0]), expected[0])


def test_handler_reports_progress_before_sampling_and_before_the_attention_maps(tiny_model):
    calls = []

    def progress(value, desc=None, **kwargs):
        calls.append((value, desc))

    handler(tiny_model[1])(PROMPT, 2, 0, 3.0, progress=progress)
    assert calls == [(0, "Sampling 2 sprites"), (0, "Attention maps")]


def test_api_client_with_a_huge_prompt_gets_the_error_at_once_and_the_demo_keeps_serving(app_url, monkeypatch):
    from gradio_client import Client

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    client = Client(app_url, verbose=False)
    started = time.monotonic()
    with pytest.raises(Exception, match="The description is 3,000,000 characters long"):
        client.predict("a" * 3_000_000, 4, 0, 3.0, api_name="/make_sprites")
    assert time.monotonic() - started < 30  # not tokenized: 3 MB used to hold the demo for 12.9 s
    gallery = client.predict(PROMPT, 2, 0, 3.0, api_name="/make_sprites")[0]
    assert len(gallery) == 2
    with pytest.raises(Exception, match="greater than maximum value 16"):  # Gradio's own slider bound, for the API
        client.predict(PROMPT, 100_000, 0, 3.0, api_name="/make_sprites")


# the queue: progress while sampling, the place in the queue while waiting, and a bounded queue

SLOW_STEPS = 300  # long enough that the first request is still sampling when the second one queues, on a loaded machine too


@pytest.fixture(scope="module")
def slow_app_url(tmp_path_factory):
    """A diffusion model sampling in SLOW_STEPS steps, served one request at a time with room for one waiting."""
    folder = tmp_path_factory.mktemp("tiny_diffusion")
    save_tiny_model(folder, "diffusion", num_inference_steps=SLOW_STEPS)
    with running_app(tmp_path_factory.mktemp("slow_app"), args=["--queue-size", "1", "--concurrency", "1"],
                     env={"POKESPRITE_MODEL": str(folder)}) as url:
        yield url


def start_generating(page, num_sprites=1):
    page.get_by_label("Description").fill(PROMPT)
    page.locator("#num input[type=number]").fill(str(num_sprites))
    page.locator("#num input[type=number]").press("Enter")
    page.locator("#generate").click()


def test_sampling_shows_its_steps_and_a_waiting_request_its_place_in_the_queue(browser, slow_app_url):
    first, second = open_page(browser, slow_app_url), open_page(browser, slow_app_url)
    try:
        start_generating(first)
        # gr.Progress follows the model's tqdm bar over the sampling steps
        first.wait_for_function(f"/\\d+\\/{SLOW_STEPS} steps/.test(document.querySelector('#sprites').innerText)",
                                timeout=90_000)
        start_generating(second)
        second.wait_for_function("document.querySelector('#sprites').innerText.includes('queue: 1/1')", timeout=90_000)
        for page in (first, second):
            page.wait_for_function("document.querySelectorAll('#sprites img').length == 1", timeout=180_000)
        assert first.outside_requests == second.outside_requests == []
    finally:
        first.close()
        second.close()


def test_queue_refuses_requests_beyond_its_size(slow_app_url, monkeypatch):
    from gradio_client import Client

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    client = Client(slow_app_url, verbose=False)
    running = client.submit(PROMPT, 1, 0, 3.0, api_name="/make_sprites")
    deadline = time.monotonic() + 60
    while running.status().code.name not in ("PROCESSING", "PROGRESS") and time.monotonic() < deadline:
        time.sleep(0.2)
    waiting = client.submit(PROMPT, 1, 1, 3.0, api_name="/make_sprites")
    time.sleep(1)
    refused = client.submit(PROMPT, 1, 2, 3.0, api_name="/make_sprites")
    with pytest.raises(Exception, match="(?i)queue is full"):
        refused.result(timeout=60)
    assert len(running.result(timeout=180)[0]) == 1 and len(waiting.result(timeout=180)[0]) == 1

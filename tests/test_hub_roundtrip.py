"""What the pushes upload loads back from a Hub, the way a user loads it.

A local Hub (olah, tests/hub_mirror.py) serves the exact folder each push would upload, committed into a mirror
repo. The clients run in a subprocess with HF_ENDPOINT pointing at the mirror and a fresh HF_HOME, so nothing can
come from this process or a cache:

- the model: `train_accelerate.push_to_hub` runs on a trainer-like output folder (model, tokenizer, card and
  sample grid next to checkpoints, logs and samples) with HfApi's two calls recorded; the files its upload_folder
  call selects become the repo. AutoModel/AutoTokenizer with trust_remote_code give the local model's sprites,
  and so does `generate.py --model <repo id>`.
- the dataset: `prepare_dataset.py`'s saved folder, pushed as `push_dataset` does (its card first, then
  `DatasetDict.push_to_hub`, whose files `hub_mirror.dataset_push_folder` writes), loads back with
  `load_dataset` row for row and pixel for pixel.

An upload to the real Hub runs only with HF_TOKEN set and huggingface.co reachable.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

import prepare_dataset
import train_accelerate
from attention_maps import sprite_grid
from hub_mirror import dataset_push_folder, hub_env, hub_mirror  # noqa: F401  (hub_mirror is a fixture)
from test_generate import MINILM, model_sprites, pixels, save_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPO = "test-user/pokesprite-tiny"
DATASET_REPO = "test-user/pokesprite-synthetic"
PROMPT = "a small blue water turtle"


def run_client(code, env, *args, timeout=180):
    """`code` in a fresh interpreter with `env`; it prints one JSON line last."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"client failed ({result.returncode}):\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def trainer_like_output(output_dir):
    """What train_accelerate.py leaves in output_dir: the final model at the top, training state around it."""
    model = save_tiny_model(output_dir, "decoder")
    cfg = yaml.safe_load((REPO_ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["output"]["hub_model_id"] = MODEL_REPO
    train_accelerate.save_model_card(output_dir, cfg, {"step": 4, "val_loss": 0.5}, "data/pokesprite", MINILM)
    sprites = model.generate([PROMPT, "a red fire lizard"], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0))
    sprite_grid(sprites, nrow=2).save(output_dir / "samples.png")
    for step in (2, 4):
        checkpoint = output_dir / f"checkpoint-{step}"
        checkpoint.mkdir()
        shutil.copyfile(output_dir / "model.safetensors", checkpoint / "model.safetensors")
        for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "ema.safetensors"):
            (checkpoint / name).write_bytes(os.urandom(64))
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (checkpoint / train_accelerate.COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    (output_dir / ".tmp-checkpoint-6").mkdir()  # a save killed halfway
    (output_dir / ".tmp-checkpoint-6" / "model.safetensors").write_bytes(b"partial")
    (output_dir / "logs" / "tiny").mkdir(parents=True)
    (output_dir / "logs" / "tiny" / "events.out.tfevents.1700000000.host.1.0").write_bytes(os.urandom(128))
    (output_dir / "samples").mkdir()
    for name in ("samples-000004.png", "attention-000004.png"):
        shutil.copyfile(output_dir / "samples.png", output_dir / "samples" / name)
    (output_dir / "wandb" / "offline-run-1").mkdir(parents=True)
    (output_dir / "wandb" / "offline-run-1" / "run-1.wandb").write_bytes(os.urandom(64))
    return model


def push_with_recorded_hub(output_dir, upload_dir, repo_id):
    """Run train_accelerate.push_to_hub with HfApi.create_repo/upload_folder recorded; copy into `upload_dir` the
    files upload_folder would send: its arguments' patterns plus huggingface_hub's own defaults, applied by
    huggingface_hub's filter_repo_objects, as upload_folder does."""
    calls = {}

    def create_repo(self, repo_id, *, private=False, exist_ok=False, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, "private": private, "exist_ok": exist_ok}

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls["upload_folder"] = {"repo_id": repo_id, "ignore_patterns": list(ignore_patterns or [])}
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
        ignore = list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS
        for relpath in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore):
            (upload_dir / relpath).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / relpath, upload_dir / relpath)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HfApi, "create_repo", create_repo)
        patch.setattr(HfApi, "upload_folder", upload_folder)
        assert train_accelerate.push_to_hub(output_dir, repo_id) == repo_id
    return calls


@pytest.fixture(scope="module")
def pushed_model(hub_mirror, tmp_path_factory):
    """(local model, trainer output folder, commit sha) of the tiny model pushed into the mirror."""
    output_dir = tmp_path_factory.mktemp("outputs") / "pokesprite"
    output_dir.mkdir()
    model = trainer_like_output(output_dir)
    upload_dir = tmp_path_factory.mktemp("upload")
    calls = push_with_recorded_hub(output_dir, upload_dir, MODEL_REPO)
    assert calls["create_repo"]["repo_id"] == calls["upload_folder"]["repo_id"] == MODEL_REPO
    return model, output_dir, hub_mirror.add_repo(MODEL_REPO, upload_dir)


# the model


def test_pushed_model_repo_holds_the_model_code_tokenizer_and_card_but_no_training_state(pushed_model, hub_mirror):
    _, output_dir, sha = pushed_model
    repo = hub_mirror.repo_path(MODEL_REPO)
    tree = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", sha], capture_output=True,
                          text=True, check=True).stdout.split()

    top_level = sorted(p.name for p in output_dir.iterdir() if p.is_file())
    assert sorted(tree) == top_level  # every file of the final model, and nothing from a subfolder
    assert {"config.json", "configuration_pokesprite.py", "modeling_pokesprite.py", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "README.md", "samples.png"} <= set(tree)
    config = json.loads((repo / "config.json").read_text())
    assert config["model_type"] == "pokesprite"
    assert config["auto_map"] == {"AutoConfig": "configuration_pokesprite.PokeSpriteConfig",
                                  "AutoModel": "modeling_pokesprite.PokeSpriteModel"}
    assert "pipeline_tag: text-to-image" in (repo / "README.md").read_text()


MODEL_CLIENT = """
import json, sys
import torch
from transformers import AutoModel, AutoTokenizer
repo, sha, prompt, out = sys.argv[1:5]
model = AutoModel.from_pretrained(repo, trust_remote_code=True, revision=sha).eval()
model.tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True, revision=sha)
torch.save(model.generate([prompt], num_images_per_prompt=3, generator=torch.Generator().manual_seed(0)), out)
print(json.dumps({"module": type(model).__module__, "class": type(model).__name__}))
"""


def test_model_from_the_hub_makes_the_same_sprites_as_the_local_model(pushed_model, hub_mirror, tmp_path):
    model, _, sha = pushed_model
    out = run_client(MODEL_CLIENT, hub_env(hub_mirror.endpoint, tmp_path / "hf_home"), MODEL_REPO, sha, PROMPT,
                     tmp_path / "sprites.pt")

    assert out["class"] == "PokeSpriteModel" and out["module"].startswith("transformers_modules.")  # the repo's code
    local = model.generate([PROMPT], num_images_per_prompt=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.load(tmp_path / "sprites.pt"), local)


def test_generate_py_takes_a_hub_repo_id(pushed_model, hub_mirror, tmp_path):
    model, _, _ = pushed_model
    out = tmp_path / "sprites"
    result = subprocess.run(
        [sys.executable, "generate.py", PROMPT, "--model", MODEL_REPO, "--num", "2", "--out", str(out)], cwd=REPO_ROOT,
        env=hub_env(hub_mirror.endpoint, tmp_path / "hf_home"), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]

    expected = model_sprites(model, PROMPT, 2, seed=0)
    for i in range(2):
        assert np.array_equal(pixels(out / f"a-small-blue-water-turtle-{i:02d}.png")[1], expected[i])
    assert (out / "grid.png").is_file()


# the dataset


DATASET_CLIENT = """
import hashlib, json, sys
from datasets import load_dataset
repo, sha = sys.argv[1:3]
splits = load_dataset(repo, revision=sha)
def row(r):
    image = r.pop("image")
    return {**r, "image": [image.mode, list(image.size), hashlib.sha256(image.tobytes()).hexdigest()]}
print(json.dumps({"features": {k: repr(v) for k, v in splits["train"].features.items()},
                  "splits": {name: [row(r) for r in split] for name, split in splits.items()}}))
"""


def test_pushed_dataset_loads_back_with_the_same_rows_and_pixels(hub_mirror, tmp_path):
    from datasets import load_from_disk

    splits, report = prepare_dataset.build_synthetic_dataset(12, seed=0)
    saved = prepare_dataset.save_dataset(splits, tmp_path / "pokesprite", card=prepare_dataset.dataset_card(
        splits, report=report, synthetic=True, repo_id=DATASET_REPO))
    # push_dataset: the card first, then DatasetDict.push_to_hub, which merges its metadata into that card
    upload = tmp_path / "upload"
    upload.mkdir()
    shutil.copyfile(saved / "README.md", upload / "README.md")
    dataset_push_folder(load_from_disk(str(saved)), upload)
    sha = hub_mirror.add_repo(DATASET_REPO, upload, repo_type="dataset")

    out = run_client(DATASET_CLIENT, hub_env(hub_mirror.endpoint, tmp_path / "hf_home"), DATASET_REPO, sha)
    local = load_from_disk(str(saved))
    assert out["features"] == {k: repr(v) for k, v in local["train"].features.items()}
    for name, split in local.items():
        expected = []
        for r in split:
            image = r.pop("image")
            expected.append({**r, "image": [image.mode, list(image.size), hashlib.sha256(image.tobytes()).hexdigest()]})
        assert out["splits"][name] == expected
    card = (hub_mirror.repo_path(DATASET_REPO, "dataset") / "README.md").read_text()
    assert "## Provenance" in card and "license: mit" in card  # the card prepare_dataset wrote...
    assert "dataset_info:" in card and "configs:" in card  # ...with what push_to_hub adds


# the real Hub


def hub_reachable(host="huggingface.co"):
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="live upload: needs HF_TOKEN (a write token) and the Hub")
def test_push_to_hub_uploads_a_private_model_repo_live(tmp_path):
    if not hub_reachable():
        pytest.skip("live upload: huggingface.co:443 is not reachable")
    output_dir = tmp_path / "pokesprite"
    output_dir.mkdir()
    trainer_like_output(output_dir)
    api = HfApi()
    repo_id = f"{api.whoami()['name']}/pokesprite-test-{uuid.uuid4().hex[:8]}"
    try:
        assert train_accelerate.push_to_hub(output_dir, repo_id, private=True) == repo_id
        assert api.model_info(repo_id).private
        files = set(api.list_repo_files(repo_id))
        assert {"config.json", "modeling_pokesprite.py", "configuration_pokesprite.py", "model.safetensors",
                "README.md", "samples.png"} <= files
        assert not [f for f in files if f.startswith(("checkpoint-", ".tmp-", "logs/", "samples/", "wandb/"))]
    finally:
        api.delete_repo(repo_id, missing_ok=True)

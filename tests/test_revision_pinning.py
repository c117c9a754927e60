"""A model loaded at a revision loads everything else from that revision too.

PokeSpriteModel loads its tokenizer lazily, on first use, from the repo it was loaded from. Two commits of one repo
are served by the local Hub (olah, tests/hub_mirror.py): A, a tiny model whose tokenizer has model_max_length 512,
and B, the same files but a tokenizer with model_max_length 7. The clients run in fresh interpreters that talk to
the local Hub only (hub_env: a fresh HF_HOME, no token), with the model's own code from the repo (trust_remote_code):

- the model card's usage snippet, run as written with revision=<A> while `main` points to B, gets A's tokenizer,
  through `model.tokenizer` and through its own AutoTokenizer line;
- a model loaded from `main` while it pointed to A keeps A's tokenizer after `main` moves to B.
"""

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import train_accelerate
from hub_mirror import hub_env, hub_mirror  # noqa: F401  (hub_mirror is a fixture)
from settings_pokesprite import load_settings
from test_generate import MINILM, save_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
PINNED_REPO = "test-user/pokesprite-pinned"
MOVING_REPO = "test-user/pokesprite-moving"
PROMPTS = ["a small blue water turtle", "a red fire lizard"]
# what `main` serves now, read with huggingface_hub alone: the model_max_length in the branch head's tokenizer config
MAIN_MAX_LENGTH = """
def main_max_length(repo):
    from huggingface_hub import hf_hub_download
    return json.load(open(hf_hub_download(repo, "tokenizer_config.json")))["model_max_length"]
"""


def client(code, env, *args, **popen):
    """`code` in a fresh interpreter, from a folder outside the repository."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                            cwd=Path(env["HF_HOME"]).parent, text=True, **popen)


def run_client(code, env, *args):
    """Run `code` to the end; the JSON line it prints last."""
    process = client(code, env, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, f"client failed ({process.returncode}):\n{stderr[-6000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def commits(tmp_path_factory, synthetic_dataset_dir):
    """Folders for commit A (the model as the trainer saves it, card included) and commit B (A with a tokenizer
    whose model_max_length is 7); every commit has its README."""
    root = tmp_path_factory.mktemp("revisions")
    a, b = root / "a", root / "b"
    save_tiny_model(a)
    settings = load_settings(REPO_ROOT / "tests" / "configs" / "tiny.yaml", hub_model_id=PINNED_REPO)
    train_accelerate.save_model_card(a, settings, {"step": 4, "val_loss": 0.5}, str(synthetic_dataset_dir), str(MINILM),
                                     prompts=PROMPTS)
    shutil.copytree(a, b)
    tokenizer_config = json.loads((b / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 512
    (b / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 7}, indent=2))
    (b / "README.md").write_text((a / "README.md").read_text() + "\nCommit B: a tokenizer of 7 tokens.\n")
    return a, b


def test_the_card_snippet_pinned_to_a_commit_gets_that_commits_tokenizer(commits, hub_mirror, tmp_path):
    a, b = commits
    sha_a = hub_mirror.add_repo(PINNED_REPO, a)
    sha_b = hub_mirror.add_repo(PINNED_REPO, b)  # main moves on
    [snippet] = re.findall(r"```python\n(.*?)```", (a / "README.md").read_text(), re.S)
    assert snippet.count('"<commit sha>"') == 1
    code = snippet.replace('"<commit sha>"', repr(sha_a)) + MAIN_MAX_LENGTH + textwrap.dedent(f"""
        import json
        print(json.dumps({{"revision": model.revision, "model.tokenizer": model.tokenizer.model_max_length,
                          "tokenizer": tokenizer.model_max_length, "main": main_max_length({PINNED_REPO!r}),
                          "sprites": len(sprites)}}))
    """)

    out = run_client(code, hub_env(hub_mirror.endpoint, tmp_path / "hf_home"))

    assert out["main"] == 7  # B is what main serves...
    assert out["revision"] == sha_a != sha_b  # ...the model knows the commit it came from...
    assert out["model.tokenizer"] == out["tokenizer"] == 512  # ...and its tokenizer is A's, both ways
    assert out["sprites"] == 4


MOVING_CLIENT = """
import json, sys
from transformers import AutoModel
repo = sys.argv[1]
# the branch main, whatever commit that is now (named: the local Hub tells a repo's default branch only by name)
model = AutoModel.from_pretrained(repo, trust_remote_code=True, revision="main")
print(json.dumps({"revision": model.revision}), flush=True)
sys.stdin.readline()  # main moves meanwhile
print(json.dumps({"model.tokenizer": model.tokenizer.model_max_length, "main": main_max_length(repo)}), flush=True)
"""


def test_a_model_loaded_from_main_keeps_its_commits_tokenizer_after_main_moves(commits, hub_mirror, tmp_path):
    a, b = commits
    sha_a = hub_mirror.add_repo(MOVING_REPO, a)
    with open(tmp_path / "client.stderr", "w") as stderr:
        process = client(MAIN_MAX_LENGTH + MOVING_CLIENT, hub_env(hub_mirror.endpoint, tmp_path / "hf_home"),
                         MOVING_REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        try:
            loaded = process.stdout.readline()  # the model is loaded, its tokenizer not yet
            assert loaded, f"client failed:\n{(tmp_path / 'client.stderr').read_text()[-6000:]}"
            assert json.loads(loaded) == {"revision": sha_a}
            hub_mirror.add_repo(MOVING_REPO, b)
            after, _ = process.communicate("go\n", timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, (tmp_path / "client.stderr").read_text()[-6000:]
    assert json.loads(after.strip().splitlines()[-1]) == {"model.tokenizer": 512, "main": 7}

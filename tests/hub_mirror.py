"""A local Hugging Face Hub for tests: stock olah serving git repos, and HfApi uploads that land in them.

* `HubMirror` runs olah (its own venv, tests/HUB_MIRROR.md) with its documented `mirrors-path` option: the git repos
  under `<root>/mirrors/{models,datasets}/<org>/<name>` are served through the Hub's download API on
  127.0.0.1:<free port>, offline (olah never calls huggingface.co). Clients reach it with `hub_env(...)`.
* `record_uploads(mirrors)` records HfApi's write calls (create_repo, upload_folder, preupload_lfs_files, create_commit)
  and commits what they upload into those git repos; everything else HfApi and HfFileSystem do stays a real HTTP call
  to the server. `push(mirror, code, hf_home)` runs upload code that way in a fresh interpreter.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
INSTALL_HINT = "python3 -m venv .venv-olah && .venv-olah/bin/pip install olah==0.5.4 (or set OLAH_BIN to an olah-cli)"


def olah_bin_or_skip():
    olah = os.environ.get("OLAH_BIN", ".venv-olah/bin/olah-cli")  # a path (absolute or from the repo root) or a name
    olah = str(REPO_ROOT / olah) if os.sep in olah else shutil.which(olah)
    if not olah or not os.access(olah, os.X_OK):
        pytest.skip(f"olah-cli not found; install it with: {INSTALL_HINT}")
    return olah


def hub_env(endpoint, hf_home):
    """os.environ for a client of the local Hub at `endpoint`, with a fresh HF_HOME and no token or other cache."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_TOKEN", "_TOKEN_PATH", "_CACHE", "_CACHE_HOME"))}
    return env | {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_XET": "1",  # olah has no Xet
                  "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
                  "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                  "HF_HUB_ETAG_TIMEOUT": "30", "HF_HUB_DOWNLOAD_TIMEOUT": "60",  # a busy CI machine is slow
                  "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def run_client(code, env, *args, timeout=300):
    """`code` in a fresh interpreter (run from the repo root) with `env`; the JSON line it prints last."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"client failed ({result.returncode}):\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


# git repos laid out as the Hub stores them


def git(repo, *args):
    env = os.environ | {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "hub",
                        "GIT_AUTHOR_EMAIL": "hub@localhost", "GIT_COMMITTER_NAME": "hub",
                        "GIT_COMMITTER_EMAIL": "hub@localhost"}
    result = subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True)
    return result.stdout.strip()


def repo_dir(mirrors, repo_id, repo_type=None):
    return Path(mirrors) / f"{repo_type or 'model'}s" / repo_id


def commit(repo, files=(), deleted=(), message="Upload"):
    """A commit on `repo`'s main branch (a new repo is created): `files` {path in repo: bytes or a local file} written,
    `deleted` paths removed. Returns its sha."""
    if not (repo / ".git").is_dir():
        repo.mkdir(parents=True, exist_ok=True)
        git(repo, "init", "-q", "-b", "main")
    for name in deleted:
        (repo / name).unlink()
    for name, data in dict(files).items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data if isinstance(data, bytes) else Path(data).read_bytes())
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def folder_files(folder):
    return {p.relative_to(folder).as_posix(): p for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# the server


class HubMirror:
    def __init__(self, root, olah_bin):
        self.root, self.olah_bin, self.proc = Path(root), olah_bin, None
        self.mirrors = self.root / "mirrors"
        self.log = self.root / "olah.out"

    def repo_path(self, repo_id, repo_type="model"):
        return repo_dir(self.mirrors, repo_id, repo_type)

    def add_repo(self, repo_id, folder, repo_type="model"):
        """Commit the files of `folder` to the repo; the new commit's sha."""
        return commit(self.repo_path(repo_id, repo_type), folder_files(folder), message=f"Upload {repo_id}")

    def __enter__(self):
        self.mirrors.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the free port can be taken between the probe and olah's bind
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            (self.root / "olah.toml").write_text(
                f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = {json.dumps(str(self.root / "cache"))}\n'
                f'mirrors-path = [{json.dumps(str(self.mirrors))}]\nhf-netloc = "127.0.0.1:9"\n'
                "[accessibility]\noffline = true\n")
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen([self.olah_bin, "-c", "olah.toml", "--log-path", "logs"], cwd=self.root,
                                             stdout=log, stderr=subprocess.STDOUT)
            self.endpoint = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(f"{self.endpoint}/api/models/x/y/revision/main", timeout=2)
                except urllib.error.HTTPError:
                    return self  # any HTTP answer: it serves
                except OSError:
                    time.sleep(0.1)
            self.__exit__()
        raise RuntimeError(f"olah did not start:\n{self.log.read_text(errors='replace')[-4000:]}")

    def __exit__(self, *exc):
        """SIGTERM olah, SIGKILL after 10 s."""
        proc, self.proc = self.proc, None
        for stop in ("terminate", "kill"):
            if proc is None or proc.poll() is not None:
                break
            getattr(proc, stop)()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="session")
def hub_mirror(tmp_path_factory):
    """The session's local Hub (skips without olah): give each test its own repo ids and HF_HOME."""
    with HubMirror(tmp_path_factory.mktemp("hub"), olah_bin_or_skip()) as mirror:
        yield mirror


# uploads, recorded at the HfApi boundary


@contextmanager
def record_uploads(mirrors):
    """HfApi's write calls, recorded into the list this yields and committed into the git repos under `mirrors`.

    Only repo_info is steered: olah knows a mirror's latest commit (`/api/<type>s/<id>`) from its cache alone, so
    a request without a revision asks for the head of main by name."""
    from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, RepoUrl
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    calls, preuploaded, real_repo_info = [], {}, HfApi.repo_info

    def url(api, repo_id, repo_type):
        return f"{api.endpoint}/{'' if repo_type in (None, 'model') else repo_type + 's/'}{repo_id}"

    def create_repo(self, repo_id, *, repo_type=None, private=False, exist_ok=False, **kwargs):
        calls.append({"call": "create_repo", "repo_id": repo_id, "repo_type": repo_type, "private": private,
                      "exist_ok": exist_ok})
        if not repo_dir(mirrors, repo_id, repo_type).exists():
            commit(repo_dir(mirrors, repo_id, repo_type), message="initial commit")
        return RepoUrl(url(self, repo_id, repo_type), endpoint=self.endpoint)

    def preupload_lfs_files(self, repo_id, additions, **kwargs):
        for op in additions:  # push_to_hub deletes each parquet shard right after this call
            with op.as_file() as f:
                preuploaded[op.path_in_repo] = f.read()
        calls.append({"call": "preupload_lfs_files", "repo_id": repo_id,
                      "paths": [op.path_in_repo for op in additions]})

    def create_commit(self, repo_id, operations, *, commit_message, repo_type=None, **kwargs):
        def content(op):
            if op.path_in_repo in preuploaded:
                return preuploaded.pop(op.path_in_repo)
            with op.as_file() as f:
                return f.read()

        added = {op.path_in_repo: content(op) for op in operations if isinstance(op, CommitOperationAdd)}
        deleted = [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)]
        sha = commit(repo_dir(mirrors, repo_id, repo_type), added, deleted, commit_message)
        calls.append({"call": "create_commit", "repo_id": repo_id, "repo_type": repo_type, "added": sorted(added),
                      "deleted": sorted(deleted), "sha": sha})
        return CommitInfo(commit_url=f"{url(self, repo_id, repo_type)}/commit/{sha}", commit_message=commit_message,
                          commit_description="", oid=sha)

    def upload_folder(self, *, repo_id, folder_path, path_in_repo="", allow_patterns=None, ignore_patterns=None,
                      repo_type=None, commit_message=None, **kwargs):
        # the real one POSTs the README to /api/validate-yaml first, which olah does not serve; this selects the files
        # as it documents (the patterns plus DEFAULT_IGNORE_PATTERNS, matched by filter_repo_objects) and commits them
        ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        calls.append({"call": "upload_folder", "repo_id": repo_id, "allow_patterns": allow_patterns,
                      "ignore_patterns": ignore})
        files = folder_files(folder_path)
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        ops = [CommitOperationAdd(prefix + name, files[name]) for name in
               filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS)]
        return self.create_commit(repo_id, ops, commit_message=commit_message or "Upload folder using huggingface_hub",
                                  repo_type=repo_type)

    def repo_info(self, repo_id, *, revision=None, **kwargs):
        return real_repo_info(self, repo_id, revision=revision or "main", **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        for method in (create_repo, preupload_lfs_files, create_commit, upload_folder, repo_info):
            patch.setattr(HfApi, method.__name__, method)
        yield calls


PUSH_CLIENT = """
import json, sys
sys.path[:0] = sys.argv[1:3]
from hub_mirror import record_uploads
with record_uploads(sys.argv[3]) as calls:
    exec(sys.argv[4])
print(json.dumps(calls))
"""


def push(mirror, code, hf_home):
    """Run the upload `code` in a fresh interpreter against `mirror`, HfApi's writes recorded into it; the calls."""
    return run_client(PUSH_CLIENT, hub_env(mirror.endpoint, hf_home), TESTS, REPO_ROOT, mirror.mirrors, code)


def dataset_push_folder(dataset_dict, out_dir, repo_id="test-user/dataset"):
    """Write into `out_dir` what `dataset_dict.push_to_hub` commits on top of the files already there (the card
    push_dataset uploads first): the real push_to_hub, run against a local Hub with HfApi's writes recorded."""
    with tempfile.TemporaryDirectory() as tmp, HubMirror(tmp, olah_bin_or_skip()) as mirror:
        mirror.add_repo(repo_id, out_dir, "dataset")
        dataset_dict.save_to_disk(f"{tmp}/saved")
        push(mirror, f"import datasets; datasets.load_from_disk({tmp + '/saved'!r}).push_to_hub({repo_id!r})",
             f"{tmp}/hf_home")
        shutil.copytree(mirror.repo_path(repo_id, "dataset"), out_dir, ignore=shutil.ignore_patterns(".git"),
                        dirs_exist_ok=True)
    return Path(out_dir)

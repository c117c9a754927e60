"""A local Hugging Face Hub for tests, served by ``olah`` from git repos on disk.

Usage in a test module::

    from hub_mirror import hub_mirror, hub_env  # noqa: F401  (hub_mirror is a fixture)

    def test_x(hub_mirror, tmp_path):
        sha = hub_mirror.add_repo("test-user/tiny", some_folder)
        env = hub_env(hub_mirror.endpoint, tmp_path / "hf_home")
        subprocess.run([sys.executable, "-c", "..."], env=env, check=True)

How it works: olah (https://github.com/vtuber-plan/olah) is a Hub mirror.  With
``mirrors-path`` set it serves git repositories laid out as
``<mirrors>/{models,datasets}/<org>/<name>`` through the Hub's download API
(``/api/{type}s/<id>/revision/<rev>``, ``/tree/``, ``/paths-info/``,
``/<id>/resolve/<rev>/<file>``), and with ``offline = true`` it never contacts
huggingface.co.  olah pins its own dependency versions, so it lives in its own
virtualenv; see tests/HUB_MIRROR.md for the install commands and the gotchas.

Nothing here imports olah, transformers, datasets or torch at import time, so
the module is cheap to import from any test.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Optional, Union

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OLAH_VERSION = "0.5.4"
DEFAULT_OLAH_BIN = REPO_ROOT / ".venv-olah" / "bin" / "olah-cli"
INSTALL_HINT = (
    f"python3 -m venv .venv-olah && .venv-olah/bin/pip install olah=={OLAH_VERSION}"
    " (or point OLAH_BIN at an olah-cli executable)"
)

# Files at least this big are committed as git-LFS pointers with the object in
# .git/lfs/objects (what the real Hub does for weights/parquet).  olah reads a
# plain git blob whole through `git cat-file` several times per HEAD request,
# which costs seconds for a 90 MB safetensors file; LFS objects are read once
# from disk.  It also gives the file a sha256 etag, as on the Hub.
DEFAULT_LFS_THRESHOLD = 1_000_000

_REPO_TYPE_DIRS = {"model": "models", "dataset": "datasets", "space": "spaces"}

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------
# locating olah
# --------------------------------------------------------------------------
def find_olah() -> Optional[str]:
    """Path of the olah-cli executable, or None.

    ``$OLAH_BIN`` wins (absolute, relative to the repo root, or a name on PATH);
    otherwise ``<repo>/.venv-olah/bin/olah-cli``.
    """
    candidate = os.environ.get("OLAH_BIN")
    if candidate:
        path = Path(candidate)
        if not path.is_absolute() and os.sep not in candidate:
            found = shutil.which(candidate)
            return found
        if not path.is_absolute():
            path = REPO_ROOT / path
    else:
        path = DEFAULT_OLAH_BIN
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def olah_bin_or_skip() -> str:
    olah = find_olah()
    if olah is None:
        where = os.environ.get("OLAH_BIN") or str(DEFAULT_OLAH_BIN)
        pytest.skip(f"olah not found at {where}; install it with: {INSTALL_HINT}")
    return olah


# --------------------------------------------------------------------------
# environment for the client processes
# --------------------------------------------------------------------------
# Variables that would make a client bypass the fresh HF_HOME or the mirror.
_CLEARED_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "TRANSFORMERS_CACHE",
    "PYTORCH_TRANSFORMERS_CACHE",
    "PYTORCH_PRETRAINED_BERT_CACHE",
    "HF_DATASETS_CACHE",
    "HF_MODULES_CACHE",
    "XDG_CACHE_HOME",
)


def hub_env(endpoint: str, hf_home: PathLike, base: Optional[Mapping[str, str]] = None) -> dict:
    """Environment for a process that must talk to the mirror at ``endpoint``.

    Starts from ``base`` (default: ``os.environ``; pass ``{}`` to get just the
    overrides), drops variables that would point the client at another cache
    or send a token, and sets:

    * HF_ENDPOINT: the mirror.
    * HF_HOME (+ the hub/datasets/modules caches under it): fresh, per test.
    * HF_HUB_DISABLE_XET=1: olah's local mirrors have no Xet storage; without it
      huggingface_hub may try the Xet path for files it thinks are Xet-backed.
    * HF_HUB_OFFLINE=0 / TRANSFORMERS_OFFLINE=0 / HF_DATASETS_OFFLINE=0: an
      inherited offline flag would silently skip the mirror.
    * HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT: more than the 10 s default
      so a loaded CI machine does not turn a slow HEAD into a failure.
    * NO_PROXY: 127.0.0.1 must not go through an HTTP(S)_PROXY.
    """
    env = dict(os.environ if base is None else base)
    for name in _CLEARED_VARS:
        env.pop(name, None)
    hf_home = Path(hf_home)
    no_proxy = ",".join(
        v for v in (env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1,localhost") if v
    )
    env.update(
        {
            "HF_ENDPOINT": endpoint,
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HF_DATASETS_CACHE": str(hf_home / "datasets"),
            "HF_MODULES_CACHE": str(hf_home / "modules"),
            "HF_XET_CACHE": str(hf_home / "xet"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_ETAG_TIMEOUT": "30",
            "HF_HUB_DOWNLOAD_TIMEOUT": "60",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }
    )
    return env


# --------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ)
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(name, None)
    env.update(
        {
            "GIT_AUTHOR_NAME": "hub-mirror",
            "GIT_AUTHOR_EMAIL": "hub-mirror@localhost",
            "GIT_COMMITTER_NAME": "hub-mirror",
            "GIT_COMMITTER_EMAIL": "hub-mirror@localhost",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
        }
    )
    out = subprocess.run(
        ["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def _lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


# Run instead of the plain olah-cli entry point (patch_olah=True).  Two
# changes to olah 0.5.4's local-mirror file route, nothing else:
# * it streams a file in 4 KiB chunks, one ASGI send each: ~6 s for a 90 MB
#   safetensors on a small CI machine; re-chunked to 1 MiB it is ~0.5 s;
# * a GET of a path missing from the commit raises KeyError -> HTTP 500; now the
#   route falls through to its normal "Entry not found" 404, as a HEAD does.
_OLAH_BOOTSTRAP = """
import sys
from olah.mirror.repos import LocalMirrorRepo

_get_file = LocalMirrorRepo.get_file

def _rechunk(chunks, size=1 << 20):
    buf, n = [], 0
    for chunk in chunks:
        buf.append(chunk)
        n += len(chunk)
        if n >= size:
            yield b"".join(buf)
            buf, n = [], 0
    if buf:
        yield b"".join(buf)

def get_file(self, commit_hash, path):
    try:
        stream = _get_file(self, commit_hash, path)
    except KeyError:
        return None
    return None if stream is None else _rechunk(stream)

LocalMirrorRepo.get_file = get_file
from olah.server import cli
sys.exit(cli())
"""


def _olah_python(olah_bin: str) -> str:
    """The interpreter of the olah-cli script (its venv's python)."""
    try:
        with open(olah_bin, "rb") as f:
            first = f.readline().decode("utf-8", "replace").strip()
        if first.startswith("#!"):
            interp = first[2:].strip().split()[0]
            if os.access(interp, os.X_OK):
                return interp
    except OSError:
        pass
    return str(Path(olah_bin).parent / "python")


class HubMirror:
    """An olah server on 127.0.0.1:<free port> serving git repos under ``root_dir``.

    ``root_dir`` gets ``mirrors/`` (the git repos), ``cache/`` (olah's own
    cache), ``logs/``, ``olah.toml`` and ``olah.out`` (server stdout+stderr).

    Use as a context manager (or call start()/stop()).  Repos can be added
    before or after the server starts.  ``patch_olah`` (default) starts olah
    through a small bootstrap that fixes two local-mirror file-route issues
    (see _OLAH_BOOTSTRAP); False runs the stock ``olah-cli``.
    """

    def __init__(
        self,
        root_dir: PathLike,
        olah_bin: Optional[str] = None,
        startup_timeout: float = 60.0,
        patch_olah: bool = True,
    ) -> None:
        self.root = Path(root_dir).resolve()
        self.mirrors_dir = self.root / "mirrors"
        self.cache_dir = self.root / "cache"
        self.log_dir = self.root / "logs"
        self.config_path = self.root / "olah.toml"
        self.output_path = self.root / "olah.out"
        self.olah_bin = olah_bin or find_olah()
        self.startup_timeout = startup_timeout
        self.patch_olah = patch_olah
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self._out = None
        for d in (self.mirrors_dir, self.cache_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)

    # ---- lifecycle -------------------------------------------------------
    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("HubMirror is not started")
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "HubMirror":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_config(self, port: int) -> None:
        # hf-netloc points at the discard port on loopback: offline mode never
        # calls it, but if some code path did, it fails fast and stays local.
        q = json.dumps  # a JSON string is a valid TOML basic string
        self.config_path.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {port}\n"
            f"repos-path = {q(str(self.cache_dir))}\n"
            f"mirrors-path = [{q(str(self.mirrors_dir))}]\n"
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "127.0.0.1:{port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{port}"\n'
            'hf-scheme = "http"\n'
            'hf-netloc = "127.0.0.1:9"\n'
            'hf-lfs-netloc = "127.0.0.1:9"\n'
            "\n[accessibility]\n"
            "offline = true\n"
        )

    def start(self) -> "HubMirror":
        if self.proc is not None:
            return self
        if self.olah_bin is None:
            raise FileNotFoundError(f"olah-cli not found; install it with: {INSTALL_HINT}")
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between probe and bind
            port = _free_port()
            self._write_config(port)
            self._out = open(self.output_path, "ab")
            args = ["-c", str(self.config_path), "--log-path", str(self.log_dir)]
            if self.patch_olah:
                cmd = [_olah_python(self.olah_bin), "-c", _OLAH_BOOTSTRAP, *args]
            else:
                cmd = [self.olah_bin, *args]
            self.proc = subprocess.Popen(
                cmd,
                cwd=str(self.root),
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
            self.port = port
            if self._wait_ready():
                return self
            last_error = self.output_tail()
            self.stop()
        raise RuntimeError(f"olah did not start; last output:\n{last_error}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            # Any HTTP answer means uvicorn is serving.  (Not "/": olah 0.5.4's
            # index page fails to render with current starlette/jinja2.)
            try:
                with urllib.request.urlopen(self.endpoint + "/api/models/hub-mirror/probe/refs", timeout=2):
                    return True
            except urllib.error.HTTPError:
                return True
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        return False

    def output_tail(self, n: int = 4000) -> str:
        try:
            return self.output_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if proc.poll() is not None:
                    break
                try:
                    os.killpg(proc.pid, sig)  # the server leads its own process group
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    continue
        if self._out is not None:
            self._out.close()
            self._out = None
        self.port = None

    # ---- repos -----------------------------------------------------------
    def repo_path(self, repo_id: str, repo_type: str = "model") -> Path:
        if repo_type not in _REPO_TYPE_DIRS:
            raise ValueError(f"repo_type must be one of {sorted(_REPO_TYPE_DIRS)}, got {repo_type!r}")
        org, sep, name = repo_id.partition("/")
        if not sep or not org or not name or "/" in name:
            # olah resolves canonical "<org>/<name>" ids only.
            raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
        return self.mirrors_dir / _REPO_TYPE_DIRS[repo_type] / org / name

    def add_repo(
        self,
        repo_id: str,
        folder: PathLike,
        repo_type: str = "model",
        *,
        branch: str = "main",
        commit_message: Optional[str] = None,
        lfs_threshold: Optional[int] = DEFAULT_LFS_THRESHOLD,
    ) -> str:
        """Commit the contents of ``folder`` as the new state of ``repo_id``.

        The repo is created on first use; later calls add a commit whose tree
        is exactly ``folder`` (files not in ``folder`` are removed), like an
        upload that replaces everything.  A README.md is added if the folder has
        none (olah answers a GET of a missing file with HTTP 500, and clients
        fetch README.md).  Files >= ``lfs_threshold`` bytes are stored as LFS
        objects (None disables).  Returns the full commit sha, usable as
        ``revision=``.  Safe to call while the server is running.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(folder)
        repo = self.repo_path(repo_id, repo_type)
        if not (repo / ".git").is_dir():
            repo.mkdir(parents=True, exist_ok=True)
            _git(repo, "init", "-q", "-b", branch)
        else:
            branches = _git(repo, "branch", "--list", "--format=%(refname:short)").split()
            if branch in branches:
                _git(repo, "checkout", "-q", "-f", branch)
            else:
                _git(repo, "checkout", "-q", "-f", "-b", branch)
        for child in repo.iterdir():
            if child.name == ".git":
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

        lfs_dir = repo / ".git" / "lfs" / "objects"
        for src in sorted(folder.rglob("*")):
            rel = src.relative_to(folder)
            if ".git" in rel.parts or src.is_dir():
                continue
            dst = repo / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            size = src.stat().st_size
            if lfs_threshold is not None and size >= lfs_threshold:
                digest = hashlib.sha256()
                with open(src, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
                oid = digest.hexdigest()
                obj = lfs_dir / oid[:2] / oid[2:4] / oid
                if not obj.exists():
                    obj.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, obj)
                dst.write_bytes(_lfs_pointer(oid, size))
            else:
                shutil.copyfile(src, dst)
        readme = repo / "README.md"
        if not readme.exists():
            readme.write_text(f"# {repo_id}\n\nTest repository served by the local hub mirror.\n")

        _git(repo, "add", "-A", ".")
        _git(repo, "commit", "-q", "--allow-empty", "-m", commit_message or f"Upload {repo_id}")
        sha = _git(repo, "rev-parse", "HEAD")
        self._seed_revision_cache(repo_type, repo_id, branch, sha)
        return sha

    def _seed_revision_cache(self, repo_type: str, repo_id: str, branch: str, sha: str) -> None:
        """Let offline olah resolve ``branch`` and the repo's latest commit.

        In offline mode olah answers ``/api/{type}s/<id>`` (no revision: what
        ``model_info(repo_id)`` / ``load_dataset(repo_id)`` ask first) and maps
        a branch name to a sha for *missing*-file probes only from its cache;
        it never looks at the local git mirror for that.  Without these files
        those requests get 401 RepoNotFound, so callers would have to pass
        ``revision=<sha>``.  The format is olah 0.5.x's
        (olah.utils.repo_utils / cache_utils).
        """
        base = self.cache_dir / "api" / _REPO_TYPE_DIRS[repo_type] / repo_id / "revision"
        if branch == "main":  # the repo's "latest commit" is main's head
            head = base / sha / "meta_head.json"
            head.parent.mkdir(parents=True, exist_ok=True)
            now = datetime.datetime.now(datetime.timezone.utc).isoformat()
            head.write_text(json.dumps({"sha": sha, "lastModified": now}))
        resolved = base / branch / "resolved_commit.json"
        resolved.parent.mkdir(parents=True, exist_ok=True)
        resolved.with_name(resolved.name + ".body").write_bytes(sha.encode("ascii"))
        resolved.write_text(json.dumps({"status_code": 200, "headers": {}, "cached_at": time.time()}))


# --------------------------------------------------------------------------
# what DatasetDict.push_to_hub uploads, written to a local folder
# --------------------------------------------------------------------------
def dataset_push_folder(
    dataset_dict,
    out_dir: PathLike,
    *,
    config_name: str = "default",
    data_dir: Optional[str] = None,
    max_shard_size: Optional[Union[int, str]] = None,
    num_shards: Optional[Mapping[str, int]] = None,
    embed_external_files: bool = True,
) -> Path:
    """Write into ``out_dir`` the files ``dataset_dict.push_to_hub(...)`` commits.

    Mirrors datasets 5.2's ``DatasetDict.push_to_hub`` / ``_push_to_repo``:
    ``<data_dir>/<split>-<i:05d>-of-<n:05d>.parquet`` shards (``data_dir``
    defaults to ``data`` for the ``default`` config, else the config name;
    shard count from ``max_shard_size``, default 500MB, or ``num_shards``;
    Image/Audio files embedded as bytes) and a README.md whose YAML has
    ``dataset_info`` and ``configs: [{config_name, data_files: [{split, path:
    <data_dir>/<split>-*}]}]``, built by datasets' own card updater.  Like a
    push, existing files in ``data_dir`` are replaced and an existing README.md
    in ``out_dir`` is updated in place.  Returns ``out_dir``.

    ``dataset_dict`` may also be a single ``Dataset`` (pushed as split "train").
    """
    from datasets import Dataset, DatasetDict
    from datasets import config as ds_config
    from datasets.arrow_dataset import _get_updated_dataset_card
    from datasets.arrow_writer import (
        get_writer_batch_size_from_data_size,
        get_writer_batch_size_from_features,
    )
    from datasets.features.features import require_decoding
    from datasets.splits import SplitInfo
    from datasets.table import embed_table_storage
    from datasets.utils.py_utils import convert_file_size_to_int
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(dataset_dict, Dataset):
        dataset_dict = DatasetDict({"train": dataset_dict})
    if config_name == "data":
        raise ValueError("`config_name` cannot be 'data'.")
    if not data_dir:
        data_dir = config_name if config_name != "default" else "data"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".push-", dir=out_dir))
    try:
        written, splits_info, uploaded_sizes, features = [], [], [], None
        for split, ds in dataset_dict.items():
            nbytes = ds._estimate_nbytes()
            batch_size = get_writer_batch_size_from_features(ds.features) or get_writer_batch_size_from_data_size(
                len(ds), nbytes
            )
            embed = embed_external_files and any(
                require_decoding(v, ignore_decode_attribute=True) for v in ds._info.features.values()
            )
            n = (num_shards or {}).get(split)
            if n is None:
                n = int(nbytes / convert_file_size_to_int(max_shard_size or ds_config.MAX_SHARD_SIZE)) + 1
            uploaded = 0
            for index in range(n):
                shard = ds.shard(num_shards=n, index=index, contiguous=True)
                if embed:
                    fmt = shard.format
                    shard = shard.with_format("arrow")
                    shard = shard.map(embed_table_storage, batched=True, batch_size=batch_size, keep_in_memory=True)
                    shard = shard.with_format(**fmt)
                name = f"{data_dir}/{split}-{index:05d}-of-{n:05d}.parquet"
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as f:
                    shard.to_parquet(f, batch_size=batch_size)
                    uploaded += f.tell()
                written.append(name)
            splits_info.append(SplitInfo(name=split, num_bytes=nbytes, num_examples=len(ds)))
            uploaded_sizes.append(uploaded)
            features = ds.features

        # The card is computed against the repo as it was before this push
        # (push_to_hub reads the old README and globs the old data files).
        card, legacy_infos = _get_updated_dataset_card(
            fs=DirFileSystem(path=str(out_dir), fs=LocalFileSystem()),
            config_name=config_name,
            splits_info=splits_info,
            features=features,
            data_dir=data_dir,
            set_default=None,
            uploaded_sizes=uploaded_sizes,
            deleted_sizes=[],
            remove_other_splits=True,
        )
        old = out_dir / data_dir
        if old.is_dir():  # push_to_hub deletes <data_dir>/* files it did not just upload
            for stale in old.iterdir():
                if stale.is_file() and f"{data_dir}/{stale.name}" not in written:
                    stale.unlink()
        for name in written:
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (out_dir / ds_config.REPOCARD_FILENAME).write_bytes(str(card).encode())
    if legacy_infos:
        (out_dir / ds_config.DATASETDICT_INFOS_FILENAME).write_text(json.dumps(legacy_infos))
    return out_dir


# --------------------------------------------------------------------------
# pytest fixture
# --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def hub_mirror(tmp_path_factory):
    """A running HubMirror shared by the session (skips if olah is missing).

    Give each test its own repo ids (or use ``add_repo`` return shas) and its
    own HF_HOME via ``hub_env(hub_mirror.endpoint, tmp_path / "hf_home")``.
    """
    olah = olah_bin_or_skip()
    with HubMirror(tmp_path_factory.mktemp("hub_mirror"), olah_bin=olah) as mirror:
        yield mirror

"""The local Hub of tests/hub_mirror.py: stock olah serves git repos through the Hub's download API, and HfApi's
uploads, recorded at its boundary, land in them. Skipped without olah (tests/HUB_MIRROR.md)."""
import json
import urllib.error
import urllib.request

import pytest

from hub_mirror import HubMirror, hub_env, hub_mirror, olah_bin_or_skip, push, run_client  # noqa: F401  (a fixture)


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def folder(path, **files):
    path.mkdir(parents=True)
    for name, text in {"README.md": "# test\n", **files}.items():  # every mirrored repo commits a README
        (path / name).parent.mkdir(exist_ok=True)
        (path / name).write_text(text)
    return path


def test_server_starts_and_stops_cleanly(tmp_path):
    with HubMirror(tmp_path / "hub", olah_bin_or_skip()) as mirror:
        proc = mirror.proc
        assert mirror.endpoint.startswith("http://127.0.0.1:")
        sha = mirror.add_repo("test-user/tiny", folder(tmp_path / "tiny", **{"a.txt": "v1"}))
        info = get_json(f"{mirror.endpoint}/api/models/test-user/tiny/revision/{sha}")
        assert info["sha"] == sha and {s["rfilename"] for s in info["siblings"]} == {"README.md", "a.txt"}
    assert proc.poll() is not None and mirror.proc is None  # stopped and reaped


def test_commits_branch_and_raw_file_api(hub_mirror, tmp_path):
    ep = hub_mirror.endpoint
    sha1 = hub_mirror.add_repo("test-user/history", folder(tmp_path / "v1", **{"a.txt": "one"}))
    sha2 = hub_mirror.add_repo("test-user/history", folder(tmp_path / "v2", **{"a.txt": "two"}))
    assert sha1 != sha2 and len(sha2) == 40
    assert get_json(f"{ep}/api/models/test-user/history/revision/main")["sha"] == sha2  # main follows the new commit
    read = lambda rev: urllib.request.urlopen(f"{ep}/test-user/history/resolve/{rev}/a.txt").read()  # noqa: E731
    assert read("main") == b"two" and read(sha2) == b"two" and read(sha1) == b"one"  # older commits stay loadable
    # a missing file at a commit: 404 EntryNotFound to the HEAD a client sends first
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"{ep}/test-user/history/resolve/{sha2}/no.json", method="HEAD"))
    assert err.value.code == 404 and err.value.headers["x-error-code"] == "EntryNotFound"


DOWNLOAD_CLIENT = """
import json, sys
from pathlib import Path
from huggingface_hub import snapshot_download
import huggingface_hub.constants as c
def files(rev):
    folder = Path(snapshot_download(sys.argv[1], revision=rev))
    return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()}
print(json.dumps({"endpoint": c.ENDPOINT, "first": files(sys.argv[2]), "second": files(sys.argv[3])}))
"""


def test_hfapi_uploads_are_recorded_and_served_at_their_commits(hub_mirror, tmp_path):
    src = folder(tmp_path / "src", **{"a.txt": "a", "sub/b.txt": "b", "debug.log": "x"})
    calls = push(hub_mirror, f"""
from huggingface_hub import HfApi
api = HfApi()
api.create_repo("test-user/uploads", private=True)
api.upload_folder(folder_path={str(src)!r}, repo_id="test-user/uploads", ignore_patterns=["*.log"])
api.delete_file("a.txt", repo_id="test-user/uploads")
""", tmp_path / "push_home")
    assert calls[0] == {"call": "create_repo", "repo_id": "test-user/uploads", "repo_type": None, "private": True,
                        "exist_ok": False}
    assert calls[1] == {"call": "upload_folder", "repo_id": "test-user/uploads", "allow_patterns": None,
                        "ignore_patterns": ["*.log"]}
    first, second = calls[2:]
    assert (first["added"], first["deleted"]) == (["README.md", "a.txt", "sub/b.txt"], [])
    assert (second["added"], second["deleted"]) == ([], ["a.txt"])

    out = run_client(DOWNLOAD_CLIENT, hub_env(hub_mirror.endpoint, tmp_path / "hf_home"), "test-user/uploads",
                     first["sha"], second["sha"])
    assert out["endpoint"] == hub_mirror.endpoint
    assert out["first"] == {"README.md": "# test\n", "a.txt": "a", "sub/b.txt": "b"}
    assert out["second"] == {"README.md": "# test\n", "sub/b.txt": "b"}

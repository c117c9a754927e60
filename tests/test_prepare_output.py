"""prepare_dataset.py's output: recovery after a kill, the write probe, the card, the image feature, the flag names."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO_ROOT
from test_prepare_dataset import run_main
from datasets import DatasetDict, Features, load_from_disk
from datasets import Image as ImageFeature
from huggingface_hub import DatasetCard

import prepare_dataset
from prepare_dataset import build_dataset, prepare


def split_numbers(dataset_dict):
    return {k: list(ds["national_number"]) for k, ds in dataset_dict.items()}


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def dead_pid():
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# a kill between the two renames of --overwrite

KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import prepare_dataset
    output, rename = Path(sys.argv[2]), Path.rename

    def rename_then_die(self, target):
        # the second rename (new dataset into place) never happens: the old one is already moved aside
        if Path(target) == output and not self.name.endswith("-old"):
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(self, target)

    Path.rename = rename_then_die
    prepare_dataset.main(sys.argv[3:])
""")


def test_kill_between_the_two_renames_of_overwrite_is_recovered_by_the_next_run(small_source, tmp_path, capsys, caplog):
    csv_path, images = small_source
    out = tmp_path / "out"
    first = prepare(csv_path, images, out)[0]
    capsys.readouterr()  # datasets' progress bars
    args = ["--csv", csv_path, "--images", images, "--output", out, "--seed", "7"]
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(REPO_ROOT), str(out), *map(str, args), "--overwrite"],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # what the kill leaves: no dataset at the path, the old one and the new one in hidden folders
    hidden = [n for n in names(tmp_path) if n.startswith(".out.tmp-")]
    assert not out.exists() and len(hidden) == 2 and sum(n.endswith("-old") for n in hidden) == 1

    code, _, err = run_main(args, capsys)  # the next run, even without --overwrite, puts the old dataset back
    assert code == 1 and err.strip() == f"error: {out} already exists; pass --overwrite to replace it"
    restored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("restored")]
    assert restored == [f"restored {out} from {next(n for n in hidden if n.endswith('-old'))}: an --overwrite run was "
                        "killed between its two renames; the dataset that run wrote was not in place and is discarded"]
    assert any(r.getMessage() == f"removed {tmp_path / next(n for n in hidden if not n.endswith('-old'))}, left by an "
               "interrupted run" for r in caplog.records)
    assert names(tmp_path) == ["out", "pokemon.csv", "small_images"]
    assert split_numbers(load_from_disk(str(out))) == split_numbers(first)

    assert run_main(args + ["--overwrite"], capsys)[0] == 0  # and the interrupted command now succeeds
    assert split_numbers(load_from_disk(str(out))) == split_numbers(build_dataset(csv_path, images, seed=7)[0])
    assert names(tmp_path) == ["out", "pokemon.csv", "small_images"]


def test_leftovers_of_dead_runs_are_removed_and_a_live_runs_folder_is_kept(small_source, tmp_path, capsys, caplog):
    csv_path, images = small_source
    out = tmp_path / "out"
    prepare(csv_path, images, out)
    pid = dead_pid()
    planted = {
        f".out.tmp-{pid}-ab12cd_x": "killed while writing",
        f".out.tmp-{pid}-ef34gh_y-old": "killed while deleting the old dataset (the output is in place)",
        ".out.tmp-k9zq1w2e": "an older version's temporary folder (no pid)",
        ".out.tmp-k9zq1w2e-old": "an older version's old dataset",
    }
    kept = {f".out.tmp-{os.getpid()}-live0001": "a run writing right now", ".outx.tmp-1-abc": "another output's",
            ".other.tmp-1-abc": "another output's"}
    for name in {**planted, **kept}:
        (tmp_path / name).mkdir()
        (tmp_path / name / "data-00000-of-00001.arrow").write_bytes(b"partial")
    assert run_main(["--csv", csv_path, "--images", images, "--output", out, "--overwrite"], capsys)[0] == 0
    assert names(tmp_path) == sorted(["out", "pokemon.csv", "small_images", *kept])
    removed = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("removed"))
    assert removed == sorted(f"removed {tmp_path / name}, left by an interrupted run" for name in planted)


def test_an_old_versions_old_dataset_is_restored_when_the_output_is_missing(synthetic_dataset_dir, tmp_path, capsys, caplog):
    """Folders named by versions before the pid was in the name (`.full.tmp-<random>-old`) are recovered too."""
    shutil.copytree(synthetic_dataset_dir, tmp_path / ".full.tmp-0a1b2c3d-old")
    shutil.copytree(synthetic_dataset_dir, tmp_path / ".full.tmp-0a1b2c3d")
    (tmp_path / ".full.tmp-9z8y7x6w").mkdir()  # an incomplete write of yet another run
    code, _, err = run_main(["--synthetic", 8, "--output", tmp_path / "full"], capsys)
    assert code == 1 and "already exists" in err  # the restored dataset is not clobbered without --overwrite
    assert names(tmp_path) == ["full"]
    assert {k: len(v) for k, v in load_from_disk(str(tmp_path / "full")).items()} == {"train": 51, "validation": 13}
    assert sum(r.getMessage().startswith("restored") for r in caplog.records) == 1


def test_an_incomplete_old_dataset_is_not_restored(synthetic_dataset_dir, tmp_path, caplog):
    shutil.copytree(synthetic_dataset_dir, tmp_path / ".out.tmp-0a1b2c3d-old")
    next((tmp_path / ".out.tmp-0a1b2c3d-old" / "train").glob("*.arrow")).unlink()
    assert prepare_dataset.recover_output(tmp_path / "out") == [
        f"removed {tmp_path / '.out.tmp-0a1b2c3d-old'}, left by an interrupted run"]
    assert names(tmp_path) == []


# an output that cannot be written


def unwritable(kind, tmp_path):
    if kind == "file_as_folder":
        (tmp_path / "notes.txt").write_text("a file, not a folder")
        return tmp_path / "notes.txt" / "sub" / "out", "is not a folder"
    # nobody, root included, can create anything in /proc
    return "/proc/pokesprite-test/out", "No such file or directory"


@pytest.mark.parametrize("kind", ["file_as_folder", "impossible"])
@pytest.mark.parametrize("source", ["csv", "synthetic"])
def test_an_unwritable_output_fails_before_any_work_with_one_line_naming_it(small_source, tmp_path, capsys, monkeypatch,
                                                                           kind, source):
    if kind == "impossible" and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux /proc")
    csv_path, images = small_source
    output, reason = unwritable(kind, tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("the data was read before the output was checked")

    monkeypatch.setattr(prepare_dataset, "build_dataset", no_work)
    monkeypatch.setattr(prepare_dataset, "build_synthetic_dataset", no_work)
    args = ["--csv", csv_path, "--images", images] if source == "csv" else ["--synthetic", 8]
    code, out, err = run_main(args + ["--output", output], capsys)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: cannot write --output_dir {output}: ") and reason in err
    assert names(tmp_path) == sorted(n for n in ["notes.txt", "pokemon.csv", "small_images"] if (tmp_path / n).exists())


def test_a_read_only_output_folder_fails_before_reading_the_csv(tmp_path):
    """A real read-only folder; root ignores permissions, so as root the CLI runs without CAP_DAC_OVERRIDE."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    command = [sys.executable, str(REPO_ROOT / "prepare_dataset.py"), "--csv", str(tmp_path / "missing.csv"),
               "--images", str(tmp_path), "--output_dir", str(tmp_path / "ro" / "out")]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("as root a read-only folder needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        (tmp_path / "ro").chmod(0o755)
    # the missing CSV would be the first error if the output were checked after the input
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == f"error: cannot write --output_dir {tmp_path / 'ro' / 'out'}: Permission denied ({tmp_path / 'ro'})"
    assert names(tmp_path / "ro") == []


def test_a_write_error_after_the_work_is_one_line_and_keeps_the_old_output(small_source, tmp_path, capsys, monkeypatch):
    csv_path, images = small_source
    out = tmp_path / "out"
    first = prepare(csv_path, images, out)[0]
    capsys.readouterr()  # datasets' progress bars

    def disk_full(self, path, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(DatasetDict, "save_to_disk", disk_full)
    code, _, err = run_main(["--csv", csv_path, "--images", images, "--output", out, "--overwrite", "--seed", "7"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: [Errno 28] No space left on device: ") and f"{tmp_path}/.out.tmp-" in err
    assert names(tmp_path) == ["out", "pokemon.csv", "small_images"]
    assert split_numbers(load_from_disk(str(out))) == split_numbers(first)


# metadata: the image feature and the dataset card


def test_the_image_feature_is_declared_rgba_and_a_dataset_without_it_still_loads(small_source, tmp_path):
    prepare(*small_source, tmp_path / "out")
    loaded = load_from_disk(str(tmp_path / "out"))
    assert loaded["train"].features["image"] == ImageFeature(mode="RGBA")
    assert all(row["image"].mode == "RGBA" for row in loaded["train"])
    # a dataset saved before the mode was declared reads the same, pixel for pixel
    old = DatasetDict({k: ds.cast(Features({**ds.features, "image": ImageFeature()})) for k, ds in loaded.items()})
    old.save_to_disk(str(tmp_path / "old"))
    reloaded = load_from_disk(str(tmp_path / "old"))
    assert reloaded["train"].features["image"].mode is None
    for a, b in zip(reloaded["train"], loaded["train"]):
        np.testing.assert_array_equal(np.asarray(a["image"].convert("RGBA")), np.asarray(b["image"]))
    assert "image modes: RGBA 8" in prepare_dataset.dataset_stats(DatasetDict(train=reloaded["train"]))


def test_the_card_is_a_hub_dataset_card_with_a_named_licence_and_no_local_path(small_source, tmp_path):
    csv_path, images = small_source
    prepare(csv_path, images, tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "other" and card.data.license_name == "pokemon-fan-content"
    assert card.data.task_categories == ["text-to-image"] and card.data.pretty_name == "PokeSprite"
    assert "`pokemon-fan-content`: Pokémon names, descriptions and artwork are ©" in card.text
    assert "from `pokemon.csv` and the sprite folder `small_images`; 10 rows read, 0 skipped" in card.text
    assert str(tmp_path) not in text and str(csv_path) not in text and "/tmp" not in text
    # a caller passing full paths still gets bare names
    direct = prepare_dataset.dataset_card(build_dataset(csv_path, images)[0], source=csv_path, images=images)
    assert str(tmp_path) not in direct and "`pokemon.csv`" in direct


def test_what_push_to_hub_uploads_keeps_the_rgba_feature_and_the_licence_fields(small_source, tmp_path):
    """The files push_dataset uploads (its card, then push_to_hub's parquet shards and merged card), loaded back
    with load_dataset as a Hub user would, offline."""
    from datasets import load_dataset
    from hub_mirror import dataset_push_folder
    prepare(*small_source, tmp_path / "out")
    upload = tmp_path / "upload"
    upload.mkdir()
    shutil.copyfile(tmp_path / "out" / "README.md", upload / "README.md")
    dataset_push_folder(load_from_disk(str(tmp_path / "out")), upload)
    card = DatasetCard.load(upload / "README.md")
    assert (card.data.license, card.data.license_name) == ("other", "pokemon-fan-content")
    assert card.data.dataset_info["features"][0] == {"name": "image", "dtype": {"image": {"mode": "RGBA"}}}
    loaded = load_dataset(str(upload), cache_dir=str(tmp_path / "cache"))
    local = load_from_disk(str(tmp_path / "out"))
    assert loaded["train"].features == local["train"].features
    for a, b in zip(loaded["train"], local["train"]):
        assert a["image"].mode == "RGBA" and a["image"].tobytes() == b["image"].tobytes()


def test_the_synthetic_card_carries_the_projects_licence(synthetic_dataset_dir):
    card = DatasetCard.load(synthetic_dataset_dir / "README.md")
    assert card.data.license == "mit" and card.data.get("license_name") is None
    assert "released under the project's own licence, MIT" in card.text and "synthetic" in card.data.tags


# one vocabulary: diffusers-style flag names next to today's


@pytest.mark.parametrize("flag", ["--output_dir", "--output"])
def test_output_dir_and_output_are_the_same_flag(small_source, tmp_path, capsys, flag):
    csv_path, images = small_source
    code, out, _ = run_main(["--csv", csv_path, "--images", images, flag, tmp_path / "prepared"], capsys)
    assert code == 0 and out.startswith(f"saved {tmp_path / 'prepared'}: train 8, validation 2")
    assert (tmp_path / "prepared" / "dataset_dict.json").is_file()


@pytest.mark.parametrize("flags", [
    ["--push_to_hub", "me/sprites", "--hub_private_repo"],
    ["--push", "me/sprites", "--private"],
    ["--push_to_hub", "--hub_model_id", "me/sprites", "--hub_private"],
    ["--push", "--hub_model_id", "me/sprites", "--private"],
    ["--push_to_hub", "me/sprites", "--hub_model_id", "me/sprites", "--hub_private_repo"],
])
def test_hub_flags_in_both_spellings_push_the_same_way(small_source, tmp_path, capsys, monkeypatch, flags):
    csv_path, images = small_source
    pushed = []
    monkeypatch.setattr(prepare_dataset, "push_dataset", lambda folder, repo, private: pushed.append((folder, repo, private)) or repo)
    code, out, _ = run_main(["--csv", csv_path, "--images", images, "--output_dir", tmp_path / "out", *flags], capsys)
    assert code == 0 and "pushed to https://huggingface.co/datasets/me/sprites" in out
    assert pushed == [(str(tmp_path / "out"), "me/sprites", True)]


def test_hub_model_id_alone_does_not_push_and_two_different_repos_are_an_error(small_source, tmp_path, capsys, monkeypatch):
    csv_path, images = small_source
    pushed = []
    monkeypatch.setattr(prepare_dataset, "push_dataset", lambda folder, repo, private: pushed.append(repo) or repo)
    args = ["--csv", csv_path, "--images", images, "--output_dir", tmp_path / "out"]
    assert run_main(args + ["--hub_model_id", "me/sprites"], capsys)[0] == 0 and pushed == []  # as in diffusers
    code, _, err = run_main(args + ["--overwrite", "--push_to_hub", "me/a", "--hub_model_id", "me/b"], capsys)
    assert code == 1 and err.strip() == "error: --push_to_hub me/a and --hub_model_id me/b name different repos"
    assert pushed == []


def test_underscore_and_hyphen_spellings_parse_the_same():
    hyphens = prepare_dataset.parse_args(["--val-split", "0.3", "--image-size", "32", "--caption-template", "{color}",
                                          "--output", "x", "--push", "me/s", "--private"])
    underscores = prepare_dataset.parse_args(["--val_split", "0.3", "--image_size", "32", "--caption_template", "{color}",
                                              "--output_dir", "x", "--push_to_hub", "me/s", "--hub_private_repo"])
    assert vars(hyphens) == vars(underscores)
    assert (underscores.val_split, underscores.image_size, underscores.output, underscores.push) == (0.3, 32, "x", "me/s")

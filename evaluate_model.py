#!/usr/bin/env python
"""Evaluate a PokeSprite model offline: does it make new sprites in the colours asked for, with variety?

    python evaluate_model.py --model outputs/pokesprite --dataset data/pokesprite --out outputs/eval

For the first `--num_prompts` validation captions it generates `--seeds` sprites each and scores them with the
local `evaluate` modules in `metrics/` (see each module's docstring for the definition and its limits):

- diversity: mean pairwise distance between the sprites of one prompt (0 = the noise is ignored);
- memorisation: distance from each sprite to its nearest training sprite, next to the same figure for the real
  validation sprites, and the share of near-copies;
- colour agreement: a fixed, non-learned colour namer against the dataset's `color` column (when it has one);
- Fréchet distance and KID to the real validation sprites, in a fixed feature space (Inception with
  `--inception_weights`);
- L1 / SSIM to the true validation sprite of each caption.

It writes `eval.json` and sample sheets (columns = prompts, rows = seeds): `validation-prompts.png`, and
`new-descriptions.png` for the descriptions in `--new_descriptions`.
"""

import argparse
import json
import time
from pathlib import Path

import evaluate
import torch
from transformers import AutoModel

from attention_maps import sprite_grid
from train_accelerate import load_splits, split_to_tensors

METRICS_DIR = Path(__file__).parent / "metrics"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model folder or Hub id")
    parser.add_argument("--revision", default=None, help="Hub revision to pin")
    parser.add_argument("--dataset", required=True, help="prepare_dataset.py output folder or Hub dataset id")
    parser.add_argument("--out", default="outputs/eval", help="where eval.json and the sheets go")
    parser.add_argument("--num_prompts", type=int, default=128, help="validation captions to generate for")
    parser.add_argument("--seeds", type=int, default=4, help="sprites per caption, one per seed")
    parser.add_argument("--sheet_prompts", type=int, default=32, help="captions across each sample sheet")
    parser.add_argument("--new_descriptions", default=None, help="text file, one description per line (# comments)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="diffusion only; default: the model's")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="diffusion only; default: the model's")
    parser.add_argument("--eta", type=float, default=None, help="diffusion only; 0 = deterministic DDIM")
    parser.add_argument("--inception_weights", default=None, help="torchvision inception_v3 state_dict for real FID")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def read_descriptions(path):
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@torch.no_grad()
def generate_per_seed(model, prompts, seeds, batch_size=256, **sampling):
    """Sprites for every prompt under seeds 0..seeds-1: a list (one per seed) of (N, C, H, W) tensors in [0, 1]."""
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda")
    per_seed = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        chunks = []
        for i in range(0, len(prompts), batch_size):
            with autocast:
                chunks.append(model.generate(prompts[i : i + batch_size], generator=generator, **sampling).float().cpu())
        per_seed.append(torch.cat(chunks))
    return per_seed


def sample_sheet(per_seed, n):
    """Columns = the first n prompts, rows = seeds, as in the reference sheets."""
    return sprite_grid(torch.cat([images[:n] for images in per_seed]), nrow=n, scale=1)


def compute_metrics(model, splits, num_prompts=128, seeds=4, batch_size=256, inception_weights=None, **sampling):
    """Every metric of the module docstring, for the first `num_prompts` validation captions.

    Returns (metrics, per_seed images). Used by this script and by the trainer at validation time.
    """
    val_split = splits["validation"].select(range(min(num_prompts, len(splits["validation"]))))
    prompts = list(val_split["text"])
    val = split_to_tensors(val_split, model.tokenizer, model.config)["pixels"].float() / 255
    train = split_to_tensors(splits["train"], model.tokenizer, model.config)["pixels"].float() / 255
    start = time.time()
    per_seed = generate_per_seed(model, prompts, seeds, batch_size, **sampling)
    seconds = time.time() - start
    first = per_seed[0]
    everything = torch.cat(per_seed)
    load = lambda name: evaluate.load(str(METRICS_DIR / name))

    metrics = {"num_prompts": len(prompts), "seeds": seeds, "sprites_per_second": len(everything) / seconds}
    group_ids = list(range(len(prompts))) * seeds
    metrics.update(prefixed("diversity", load("diversity").compute(predictions=everything, group_ids=group_ids)))
    metrics.update(prefixed("memorisation", load("memorisation").compute(predictions=first, references=val, train_images=train)))
    if "color" in val_split.column_names:
        colours = list(val_split["color"])
        metrics.update(prefixed("colour", load("colour_agreement").compute(predictions=first, references=colours)))
    metrics.update(prefixed("frechet", load("frechet").compute(predictions=first, references=val, inception_weights=inception_weights)))
    metrics.update(prefixed("reconstruction", load("reconstruction").compute(predictions=first, references=val)))
    return metrics, per_seed


def prefixed(prefix, results):
    """Scalar results only (confusion tables and the like stay in the module's own output)."""
    return {f"{prefix}/{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, revision=args.revision).to(args.device).eval()
    sampling = {}
    if model.config.generator_type == "diffusion":
        sampling = {"guidance_scale": args.guidance_scale, "num_inference_steps": args.num_inference_steps, "eta": args.eta}
    splits = load_splits(args.dataset)

    metrics, per_seed = compute_metrics(model, splits, args.num_prompts, args.seeds, args.batch_size, args.inception_weights, **sampling)
    metrics.update({"model": args.model, "generator_type": model.config.generator_type})
    metrics.update({k: v for k, v in sampling.items() if v is not None})
    sample_sheet(per_seed[:2], min(args.sheet_prompts, len(per_seed[0]))).save(out / "validation-prompts.png")
    if args.new_descriptions:
        descriptions = read_descriptions(args.new_descriptions)
        new = generate_per_seed(model, descriptions, 2, args.batch_size, **sampling)
        sample_sheet(new, len(descriptions)).save(out / "new-descriptions.png")
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    for key, value in metrics.items():
        print(f"{key:40s} {value:.4f}" if isinstance(value, float) else f"{key:40s} {value}")
    return metrics


if __name__ == "__main__":
    main()

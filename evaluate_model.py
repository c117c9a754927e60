#!/usr/bin/env python
"""Evaluate a PokeSprite model offline: does it make new sprites in the colours asked for, with variety?

    python evaluate_model.py --model outputs/pokesprite --dataset data/pokesprite --output_dir outputs/eval

For the first `--num_prompts` validation captions it generates `--num_images_per_prompt` sprites each (one per
seed 0, 1, ...) and scores them with the local `evaluate` modules in `metrics/` (see each module's docstring for
the definition and its limits):

- diversity: mean pairwise distance between the sprites of one prompt (0 = the noise is ignored);
- memorisation: distance from each sprite to its nearest training sprite, next to the same figure for the real
  validation sprites, and the share of near-copies;
- colour agreement: a fixed, non-learned colour namer against the dataset's `color` column (when it has one);
- Fréchet distance and KID to the real validation sprites, in a fixed feature space (Inception with
  `--inception_weights`);
- L1 / SSIM to the true validation sprite of each caption;
- structure: speckle inside the creature (roughness), how far its silhouette is from a round blob (silhouette
  complexity, concavity), its size (coverage) and its share in thin parts such as legs, tails and ears (limbs), each
  as a ratio to the real validation sprites'. The distribution metrics above cannot tell coherent creatures from
  speckle in the right colours (RESULTS.md, "What the metrics see"); these can, roughly;
- training fit (`--train_prompts`, models only): drawn from the first training captions with seed 0, the share of
  sprites whose nearest training sprite (or its mirror image) is their own, and their L1 / SSIM to it. A model
  that cannot redraw the sprites it was trained on will not draw coherent new ones (RESULTS.md: a model that
  scored well on every validation metric drew mottled blobs, and redrew none of its training sprites).

It writes `eval.json` and sample sheets (columns = prompts, rows = seeds): `validation-prompts.png`,
`new-descriptions.png` for the descriptions in `--new_descriptions`, and `training-prompts.png` (the sprites drawn
from training captions above the training sprites themselves). `validation-all.png` holds every sprite scored, laid
out the same way, for judges that need more sprites than a sheet (`scripts/layout_judge.py`).

`--reference` scores what a model is measured against, through the same metrics, instead of a model:

    python evaluate_model.py --reference retrieval --dataset data/pokesprite --output_dir outputs/eval-retrieval

- real: the true validation sprites (the ceiling); "seed" k > 0 is the real sprite of another caption, so its
  diversity is that between different real sprites;
- retrieval: a copy machine, the training sprite of the nearest training caption (cosine similarity of the text
  encoder's mean-pooled features), the k-th nearest for seed k;
- mean: the mean training sprite, whatever the caption.

The options have the diffusers scripts' names (--output_dir, --num_images_per_prompt, --num_inference_steps,
--guidance_scale), as in generate.py and train_accelerate.py; the earlier --out and --seeds still work.
"""

import argparse
import sys
import time
from pathlib import Path

import evaluate
import torch
from transformers import AutoModel, AutoTokenizer

from configuration_pokesprite import PokeSpriteConfig

from attention_maps import sprite_grid
from data_pokesprite import load_splits, split_pixels, write_json
from generate import GenerateError, check_output_folder, config_range, read_prompts_file, sampling_options

METRICS_DIR = Path(__file__).parent / "metrics"
REFERENCES = ("real", "retrieval", "mean")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a saved model folder or Hub id")
    what.add_argument("--reference", choices=REFERENCES, help="score a reference instead of a model (see above)")
    parser.add_argument("--text_encoder", default="sentence-transformers/all-MiniLM-L6-v2",
                        help="--reference retrieval: the BERT whose pooled features find the nearest caption")
    parser.add_argument("--revision", default=None, help="Hub revision to pin")
    parser.add_argument("--dataset", required=True, help="prepare_dataset.py output folder or Hub dataset id")
    parser.add_argument("--output_dir", "--out", default="outputs/eval", help="where eval.json and the sheets go")
    parser.add_argument("--num_prompts", type=int, default=128, help="validation captions to generate for")
    parser.add_argument("--num_images_per_prompt", "--seeds", dest="seeds", type=int, default=4,
                        help="sprites per caption, one per seed 0, 1, ... (default: %(default)s)")
    parser.add_argument("--sheet_prompts", type=int, default=32, help="captions across each sample sheet")
    parser.add_argument("--new_descriptions", default=None,
                        help="a prompts file, as generate.py's --prompts_file: one description per line (# comments)")
    parser.add_argument("--train_prompts", type=int, default=64,
                        help="models only: training captions to redraw for the training-fit scores (0: skip)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="iterative generators only; default: the model's")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="iterative generators only; default: the model's")
    parser.add_argument("--eta", type=config_range("eta"), default=None,
                        help="iterative generators only: fresh noise at each step, 0 (deterministic) to 1")
    parser.add_argument("--flow_shift", type=config_range("flow_shift"), default=None,
                        help="flow and latent-flow models (the others ignore it): shift the Euler steps towards high noise "
                             "(PokeSpriteConfig.flow_shift); default: the model's")
    parser.add_argument("--epsilon_scaling", type=config_range("epsilon_scaling"), default=None,
                        help="iterative generators only: divide the noise each step carries on by this "
                             "(PokeSpriteConfig.epsilon_scaling); default: the model's")
    parser.add_argument("--inception_weights", default=None, help="torchvision inception_v3 state_dict for real FID")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def read_descriptions(path):
    """The descriptions of a --new_descriptions file, read by generate.read_prompts_file (the one prompts-file reader)."""
    return [prompt for prompt, _ in read_prompts_file(path, "--new_descriptions")]


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
                chunks.append(model.generate(prompts[i : i + batch_size], generator=generator, progress_bar=False,
                                             **sampling).float().cpu())
        per_seed.append(torch.cat(chunks))
    return per_seed


def sample_sheet(per_seed, n):
    """Columns = the first n prompts, rows = seeds, as in the reference sheets."""
    return sprite_grid(torch.cat([images[:n] for images in per_seed]), nrow=n, scale=1)


@torch.no_grad()
def reference_per_seed(kind, prompts, val, train, seeds, train_texts=None, text_encoder=None, batch_size=256):
    """What a reference draws for `prompts` (their true sprites are `val`), as `generate_per_seed` returns it."""
    if kind == "mean":
        return [train.mean(0, keepdim=True).expand(len(prompts), -1, -1, -1)] * seeds
    if kind == "real":
        return [val.roll(-k, dims=0) for k in range(seeds)]
    tokenizer, bert = AutoTokenizer.from_pretrained(text_encoder), AutoModel.from_pretrained(text_encoder).eval()

    def pooled(texts):
        chunks = []
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, return_tensors="pt")
            hidden = bert(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            chunks.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(chunks)

    nearest = (pooled(prompts) @ pooled(train_texts).T).topk(seeds, dim=1).indices  # (prompts, seeds)
    return [train[nearest[:, k]] for k in range(seeds)]


def compute_metrics(splits, train, sprites_for, config, num_prompts=128, seeds=4, inception_weights=None):
    """Every metric of the module docstring, for the first `num_prompts` validation captions.

    `train` is the training split's sprites, (M, C, H, W) in [0, 1]. `sprites_for(prompts, seeds, val, train)` returns
    the sprites to score (a list of one (N, C, H, W) tensor in [0, 1] per seed); `val` is decoded as `config` says. Returns (metrics,
    per_seed images).
    """
    val_split = splits["validation"].select(range(min(num_prompts, len(splits["validation"]))))
    prompts = list(val_split["text"])
    val = split_pixels(val_split, config.image_size, config.num_channels).float() / 255
    start = time.time()
    per_seed = sprites_for(prompts, seeds, val, train)
    seconds = time.time() - start
    first = per_seed[0]
    everything = torch.cat(per_seed)
    load = lambda name: evaluate.load(str(METRICS_DIR / name))

    metrics = {"num_prompts": len(prompts), "seeds": seeds, "seconds_per_sprite": seconds / len(everything)}
    group_ids = list(range(len(prompts))) * seeds
    metrics.update(prefixed("diversity", load("diversity").compute(predictions=everything, group_ids=group_ids)))
    metrics.update(prefixed("memorisation", load("memorisation").compute(predictions=first, references=val, train_images=train)))
    if "color" in val_split.column_names:
        colours = list(val_split["color"])
        metrics.update(prefixed("colour", load("colour_agreement").compute(predictions=first, references=colours)))
    metrics.update(prefixed("frechet", load("frechet").compute(predictions=first, references=val, inception_weights=inception_weights)))
    metrics.update(prefixed("reconstruction", load("reconstruction").compute(predictions=first, references=val)))
    metrics.update(prefixed("structure", load("sprite_structure").compute(predictions=first, references=val)))
    return metrics, per_seed


def training_fit(model, splits, train, num_prompts, sheet_prompts=32, batch_size=256, **sampling):
    """The training-fit scores of the module docstring, and the sheet: drawn sprites above the training sprites
    (`train`, the training split's sprites in [0, 1])."""
    prompts = list(splits["train"]["text"][:num_prompts])
    own = train[: len(prompts)]
    drawn = generate_per_seed(model, prompts, 1, batch_size, **sampling)[0]
    metrics = {"fit/nearest_is_own": nearest_is_own(drawn, train)}
    metrics.update(prefixed("fit", evaluate.load(str(METRICS_DIR / "reconstruction")).compute(predictions=drawn, references=own)))
    return metrics, sample_sheet([drawn, own], min(sheet_prompts, len(own)))


def nearest_is_own(drawn, train):
    """The share of sprites drawn[i] whose nearest training sprite is train[i] or its mirror image (the trainer
    flips sprites at random, so a mirrored redraw is as much its own)."""
    nearest = evaluate.load(str(METRICS_DIR / "memorisation")).compute(
        predictions=drawn, references=train[: len(drawn)], train_images=torch.cat([train, train.flip(-1)]),
        return_per_sample=True)["nearest_train_index"]
    return ((torch.tensor(nearest) % len(train)) == torch.arange(len(drawn))).float().mean().item()


def prefixed(prefix, results):
    """Scalar results only (confusion tables and the like stay in the module's own output)."""
    return {f"{prefix}/{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    # before the slow part: the output folder can be written, the descriptions file read
    check_output_folder(out)
    descriptions = read_descriptions(args.new_descriptions) if args.new_descriptions and args.model else None
    splits = load_splits(args.dataset)
    sampling = {}
    if args.model:
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True, revision=args.revision).to(args.device).eval()
        if model.uses_guidance:
            sampling = sampling_options(model, guidance_scale=args.guidance_scale,
                                        num_inference_steps=args.num_inference_steps, eta=args.eta,
                                        flow_shift=args.flow_shift, epsilon_scaling=args.epsilon_scaling)
        config = model.config
        sprites_for = lambda prompts, seeds, val, train: generate_per_seed(model, prompts, seeds, args.batch_size, **sampling)
        about = {"model": args.model, "generator_type": model.config.generator_type}
    else:
        train_texts = list(splits["train"]["text"])
        sprites_for = lambda prompts, seeds, val, train: reference_per_seed(
            args.reference, prompts, val, train, seeds, train_texts, args.text_encoder, args.batch_size)
        config = PokeSpriteConfig()  # the sprites as a default model would see them
        about = {"reference": args.reference}

    train = split_pixels(splits["train"], config.image_size, config.num_channels).float() / 255  # decoded once, for both scores
    metrics, per_seed = compute_metrics(splits, train, sprites_for, config, args.num_prompts, args.seeds,
                                        args.inception_weights)
    metrics.update(about)
    metrics.update(sampling)
    sample_sheet(per_seed[:2], min(args.sheet_prompts, len(per_seed[0]))).save(out / "validation-prompts.png")
    sample_sheet(per_seed, len(per_seed[0])).save(out / "validation-all.png")
    if args.model and args.train_prompts > 0:
        fit, sheet = training_fit(model, splits, train, args.train_prompts, args.sheet_prompts, args.batch_size, **sampling)
        metrics.update(fit)
        sheet.save(out / "training-prompts.png")
    if descriptions:
        new = generate_per_seed(model, descriptions, 2, args.batch_size, **sampling)
        sample_sheet(new, len(descriptions)).save(out / "new-descriptions.png")
    write_json(out / "eval.json", metrics)
    for key, value in metrics.items():
        print(f"{key:40s} {value:.4f}" if isinstance(value, float) else f"{key:40s} {value}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

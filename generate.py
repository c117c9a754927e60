#!/usr/bin/env python
"""Sprites from descriptions with a trained PokeSprite model: a folder or a Hub id.

    python generate.py "a small blue water turtle" --model outputs/pokesprite --num 8 --seed 0 --out sprites/
    python generate.py --prompts-file docs/new_descriptions.txt --model <user>/pokesprite --revision <commit> --attention

For each prompt it writes `<slug>-<index>.png` (RGBA with a transparent background when the model has alpha) and,
with --attention, `<slug>-attention.png` (the first sprite and one heatmap per word); then `grid.png`, one row per
prompt on white. A prompt and a seed give the same sprites whatever else is in the prompt list, on any device.
"""

import argparse
import json
import os
import re
import sys
import tempfile
import unicodedata
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError, RemoteEntryNotFoundError
from torchvision.transforms.functional import to_pil_image
from transformers import AutoModel, AutoTokenizer

from attention_maps import save_attention_maps, sprite_grid


class GenerateError(Exception):
    """A problem with the command's input; its message is the one line the user sees."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="one or more descriptions (quote each)")
    parser.add_argument("--prompts-file", help="a text file of descriptions, one per line; blank lines and #comments are skipped")
    parser.add_argument("--model", default=os.environ.get("POKESPRITE_MODEL", "outputs/pokesprite"),
                        help="a trained model folder or Hub id (default: $POKESPRITE_MODEL or outputs/pokesprite)")
    parser.add_argument("--revision", help="Hub branch, tag or commit to load; pin a commit to pin the model's code")
    parser.add_argument("--num", type=positive_int, default=8, help="sprites per prompt")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same sprites")
    parser.add_argument("--out", default="sprites", help="output folder, created if missing")
    parser.add_argument("--attention", action="store_true", help="also write each prompt's per-word attention heatmaps")
    parser.add_argument("--guidance-scale", type=float, help="diffusion models: classifier-free guidance (default: the model's)")
    parser.add_argument("--steps", type=positive_int, help="diffusion models: DDIM sampling steps (default: the model's)")
    parser.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    return parser.parse_args(argv)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# prompts


def read_prompts(args):
    """[(prompt, where)]: the command line's prompts, then the file's, with where each came from for messages."""
    prompts = []
    for i, prompt in enumerate(args.prompts, 1):
        where = "the prompt" if len(args.prompts) == 1 else f"prompt {i} on the command line"
        if not prompt.strip():
            raise GenerateError(f"{where} is empty; describe the sprite, e.g. \"a small blue water turtle\"")
        prompts.append((prompt.strip(), where))
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM is not part of line 1
        except (OSError, UnicodeDecodeError) as e:
            raise GenerateError(f"cannot read --prompts-file {path}: {getattr(e, 'strerror', None) or e}")
        found = [(line.strip(), f"line {n} of {path}") for n, line in enumerate(lines, 1)
                 if line.strip() and not line.strip().startswith("#")]
        if not found:
            raise GenerateError(f"--prompts-file {path} has no prompts (blank lines and #comments are skipped)")
        prompts += found
    if not prompts:
        raise GenerateError("no prompt: give one, e.g. generate.py \"a small blue water turtle\", or --prompts-file FILE")
    return prompts


def count_tokens(tokenizer, prompt, max_length):
    """(tokens in the prompt, special tokens included; the text truncation to `max_length` drops, or '')."""
    content = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    specials = tokenizer.num_special_tokens_to_add()
    dropped = tokenizer.decode(content[max_length - specials:]) if len(content) + specials > max_length else ""
    return len(content) + specials, dropped


def check_prompt(tokenizer, prompt, where, max_length):
    """An error for a prompt with no tokens; a warning, with the token counts, for one that will be truncated."""
    n_tokens, dropped = count_tokens(tokenizer, prompt, max_length)
    if n_tokens == tokenizer.num_special_tokens_to_add():
        raise GenerateError(f"{where} is empty once tokenized ({prompt!r} has no characters the tokenizer reads)")
    if dropped:
        dropped = dropped if len(dropped) <= 60 else dropped[:57] + "..."
        print(f"warning: {where} is {n_tokens} tokens long; the model reads the first {max_length} "
              f"(config.max_text_length), so it ignores: {dropped!r}", file=sys.stderr)


def slugify(prompt, max_length=48):
    """'A small blue Pokémon!' -> 'a-small-blue-pokemon': a file name from a prompt."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    if len(slug) > max_length:  # cut at a word boundary when there is one
        slug = slug[:max_length + 1].rsplit("-", 1)[0] if "-" in slug[:max_length + 1] else slug[:max_length]
    return slug or "prompt"


def unique_slugs(prompts):
    slugs, seen = [], {}
    for prompt in prompts:
        slug = slugify(prompt)
        seen[slug] = seen.get(slug, 0) + 1
        slugs.append(slug if seen[slug] == 1 else f"{slug}-{seen[slug]}")
    return slugs


# checks before the model loads


def check_output_folder(out):
    """Create `out` and write a probe file into it, so an unwritable folder fails before the slow part."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise GenerateError(f"cannot write to --out {out}: {e.strerror or e}")


def read_model_config(model, revision):
    """The model's config.json (a folder's, or downloaded from the Hub), checked to be a PokeSprite model."""
    hint = "pass --model a folder written by train_accelerate.py or the Hub id it was pushed to"
    if Path(model).exists():
        path = Path(model) / "config.json"
        if not path.is_file():
            raise GenerateError(f"{model} is not a PokeSprite model: it has no config.json; {hint}")
    else:
        try:
            path = Path(hf_hub_download(model, "config.json", revision=revision))
        except RemoteEntryNotFoundError:  # the repo exists; LocalEntryNotFoundError (offline) is below
            raise GenerateError(f"{model} is not a PokeSprite model: the repo has no config.json; {hint}")
        except (HFValidationError, OSError) as e:  # HfHubHTTPError and the offline errors are OSErrors
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GenerateError(f"--model {model!r} is neither a folder nor a Hub model that can be loaded ({reason})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise GenerateError(f"{model} is not a PokeSprite model: its config.json is not valid JSON; {hint}")
    if not isinstance(config, dict) or config.get("model_type") != "pokesprite":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise GenerateError(f"{model} is not a PokeSprite model: config.json has model_type {found!r}, not 'pokesprite'; {hint}")
    return config


def pick_device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GenerateError(f"--device {name!r} is not a torch device (try cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    return device


def load_model(name, revision=None, device=None):
    """A PokeSprite model (folder or Hub id) with its tokenizer attached, in eval mode on `device`.

    config.json is checked first, so that a folder or repo that is not a PokeSprite model fails with a clear
    message instead of a transformers traceback.
    """
    read_model_config(name, revision)
    if revision and Path(name).exists():
        print(f"warning: --revision applies to Hub models; {name} is a folder, loaded as it is", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=True, revision=revision)
        model = AutoModel.from_pretrained(name, trust_remote_code=True, revision=revision)
    except (OSError, ValueError) as e:
        raise GenerateError(f"cannot load the model {name}: {str(e).strip().splitlines()[0]}")
    model.tokenizer = tokenizer
    return model.to(pick_device(device)).eval()


def main(argv=None):
    args = parse_args(argv)
    prompts = read_prompts(args)
    out = Path(args.out)
    check_output_folder(out)
    pick_device(args.device)  # a bad --device fails before the model loads, too
    model = load_model(args.model, args.revision, args.device)
    tokenizer = model.tokenizer
    for prompt, where in prompts:
        check_prompt(tokenizer, prompt, where, model.config.max_text_length)
    # the sprites and the attention figure are sampled the same way; None: the model's config says
    sampling = {}
    if model.config.generator_type == "diffusion":
        sampling = {"guidance_scale": args.guidance_scale, "num_inference_steps": args.steps}
    elif args.guidance_scale is not None or args.steps is not None:
        print("warning: --guidance-scale and --steps apply to diffusion models; this is a decoder model, so they are ignored",
              file=sys.stderr)

    written, grid = [], []
    width = max(2, len(str(args.num - 1)))
    for (prompt, _), slug in zip(prompts, unique_slugs([p for p, _ in prompts])):
        # a fresh generator per prompt: its sprites do not depend on the other prompts of the run
        generator = torch.Generator().manual_seed(args.seed)
        sprites = model.generate([prompt], num_images_per_prompt=args.num, generator=generator, **sampling).cpu()
        for i, sprite in enumerate(sprites):
            path = out / f"{slug}-{i:0{width}d}.png"
            to_pil_image((sprite * 255).round().to(torch.uint8)).save(path)
            written.append(path)
        grid.append(sprites)
        print(f"{prompt!r}: {args.num} sprites -> {out / slug}-*.png")
        if args.attention:
            path = out / f"{slug}-attention.png"
            words = save_attention_maps(model, prompt, path, seed=args.seed, tokenizer=tokenizer, **sampling)
            written.append(path)
            print(f"  attention over {len(words)} tokens -> {path}")
    path = out / "grid.png"
    sprite_grid(torch.cat(grid), nrow=args.num).save(path)
    written.append(path)
    print(f"grid ({len(prompts)} prompts x {args.num} seeds) -> {path}")
    return written


if __name__ == "__main__":
    try:
        main()
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

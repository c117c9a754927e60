#!/usr/bin/env python
"""Sprites from descriptions with a trained PokeSprite model: a folder or a Hub id.

    python generate.py "a small blue water turtle" --model outputs/pokesprite --num_images_per_prompt 8 --seed 0 \
        --output_dir sprites/
    python generate.py --prompts_file docs/new_descriptions.txt --model <user>/pokesprite --revision <commit> --attention

The options have the diffusers scripts' names (--output_dir, --num_images_per_prompt, --num_inference_steps,
--guidance_scale); the earlier --out, --num, --steps, --guidance-scale, --prompts-file and --batch-size still work.

For each prompt it writes `<slug>-<index>.png` (RGBA with a transparent background when the model has alpha) and,
with --attention, `<slug>-attention.png` (the first sprite and one heatmap per word); then `grid.png`, one row per
prompt on white. A prompt and a seed give the same sprites whatever else is in the prompt list, on any device.

Sprites are made --batch_size at a time and written as each batch finishes, so memory does not grow with
--num_images_per_prompt; the sprites depend on the batch size only beyond the first batch.
"""

import argparse
import errno
import inspect
import json
import os
import re
import sys
import tempfile
import unicodedata
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError, RemoteEntryNotFoundError
from safetensors import SafetensorError, safe_open
from torchvision.transforms.functional import to_pil_image
from transformers import AutoModel, AutoTokenizer

from attention_maps import save_attention_maps, sprite_grid
from configuration_pokesprite import FLOAT_RANGES


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
MAX_PROMPTS_FILE_BYTES = 1024 * 1024  # read no more of --prompts-file than this (/dev/zero must not fill memory)
MAX_PROMPTS = 10_000  # prompts in one run
DEFAULT_BATCH_SIZE = 64  # sprites per model.generate call: bounds peak memory whatever --num is
MAX_BATCH_SIZE = 4096
GRID_MAX_ROWS, GRID_MAX_COLUMNS = 64, 16  # grid.png shows at most this many prompts and sprites of each


class GenerateError(Exception):
    """A problem with the command's input; its message is the one line the user sees."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the diffusers scripts' names first; the earlier ones stay as aliases (spelled: messages use the typed one)
    parser.add_argument("prompts", nargs="*", help="one or more descriptions (quote each)")
    parser.add_argument("--prompts_file", "--prompts-file", action=Spelled,
                        help="a text file of descriptions, one per line; blank lines and #comments are skipped")
    parser.add_argument("--model", default=os.environ.get("POKESPRITE_MODEL", "outputs/pokesprite"),
                        help="a trained model folder or Hub id (default: $POKESPRITE_MODEL or outputs/pokesprite)")
    parser.add_argument("--revision", help="Hub branch, tag or commit to load; pin a commit to pin the model's code")
    parser.add_argument("--num_images_per_prompt", "--num", type=positive_int, default=8, action=Spelled,
                        help="sprites per prompt (default: %(default)s)")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help=f"the same seed gives the same sprites (0 to {MAX_SEED})")
    parser.add_argument("--batch_size", "--batch-size", type=batch_size_int, default=DEFAULT_BATCH_SIZE, action=Spelled,
                        help="sprites generated at once; lower it if memory runs out (default: %(default)s)")
    parser.add_argument("--output_dir", "--out", default="sprites", action=Spelled,
                        help="output folder, created if missing (default: %(default)s)")
    parser.add_argument("--attention", action="store_true", help="also write each prompt's per-word attention heatmaps")
    parser.add_argument("--guidance_scale", "--guidance-scale", type=float, action=Spelled,
                        help="iterative models (all but the decoder): classifier-free guidance (default: the model's)")
    parser.add_argument("--num_inference_steps", "--steps", type=positive_int, action=Spelled,
                        help="iterative models: sampling steps (default: the model's)")
    parser.add_argument("--eta", type=config_range("eta"),
                        help="iterative models: 0 = deterministic steps, up to 1 = fresh noise at each step "
                             "(smoother sprites; default: the model's)")
    parser.add_argument("--flow_shift", type=config_range("flow_shift"),
                        help="flow and latent-flow models: > 1 spends more of the sampling steps at high noise (SD3's time shift; "
                             "default: the model's); diffusion models ignore it")
    parser.add_argument("--epsilon_scaling", type=config_range("epsilon_scaling"),
                        help="iterative models: divide the noise each step carries on by this; a little above 1 counters "
                             "exposure bias, mottled bodies (default: the model's)")
    parser.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false",
                        help="no progress bar over the sampling steps (for logs)")
    parser.set_defaults(spelled={})
    return parser.parse_args(argv)


class Spelled(argparse.Action):
    """argparse's plain "store", which also notes the name the option was given by in `args.spelled` ({dest: name}),
    so that a message names an option the way the user wrote it (`flag`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.spelled = {**namespace.spelled, self.dest: option_string}


def flag(args, dest):
    """The name option `dest` was given by on the command line, else its main name (--dest)."""
    return getattr(args, "spelled", {}).get(dest) or f"--{dest}"


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def batch_size_int(text):
    value = positive_int(text)
    if value > MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_BATCH_SIZE}, got {value}")
    return value


def config_range(field):
    """An argparse type for a sampling option: a number in PokeSpriteConfig's range for `field`, checked before the
    model loads."""
    low, high = FLOAT_RANGES[field]

    def number(text):
        value = float(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {text}")
        return value

    return number


def seed_int(text):
    """A seed torch.Generator.manual_seed accepts, checked before the model loads."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_SEED} (2**64 - 1), got {value}")
    return value


def check_seed(seed):
    """`seed` as an int, or a GenerateError when it is not a whole number from 0 to MAX_SEED (for the web demo)."""
    try:
        value = int(seed)
    except (TypeError, ValueError, OverflowError):  # None, NaN, infinity, text
        raise GenerateError(f"the seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    if value != seed or not 0 <= value <= MAX_SEED:
        raise GenerateError(f"the seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
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
        prompts += read_prompts_file(args.prompts_file, flag(args, "prompts_file"))
    if not prompts:
        raise GenerateError("no prompt: give one, e.g. generate.py \"a small blue water turtle\", or --prompts_file FILE")
    if len(prompts) > MAX_PROMPTS:
        source = f" (with {flag(args, 'prompts_file')} {args.prompts_file})" if args.prompts_file else ""
        raise GenerateError(f"{len(prompts)} prompts{source}; one run takes at most {MAX_PROMPTS}: split them into several runs")
    return prompts


def read_prompts_file(path, option="--prompts_file"):
    """[(prompt, where)] of a prompts file: one description per line, blank lines and lines starting with # skipped,
    `where` naming the line ("line 3 of prompts.txt") for messages.

    The one reader of a prompts file: generate.py's --prompts_file, evaluate_model.py's --new_descriptions. It reads
    at most MAX_PROMPTS_FILE_BYTES (a device or a pipe may never end); a file it cannot read, a larger one and one
    without prompts are a GenerateError naming `option`, the flag that gave the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPTS_FILE_BYTES + 1)
        if len(data) > MAX_PROMPTS_FILE_BYTES:
            raise GenerateError(f"{option} {path} is larger than {MAX_PROMPTS_FILE_BYTES // 1024 // 1024} MiB, the "
                                f"most it reads; split it into smaller files (one prompt per line, at most {MAX_PROMPTS} a run)")
        lines = data.decode("utf-8-sig").splitlines()  # -sig: a BOM is not part of line 1
    except (OSError, UnicodeDecodeError) as e:
        raise GenerateError(f"cannot read {option} {path}: {getattr(e, 'strerror', None) or e}")
    prompts = [(line.strip(), f"line {n} of {path}") for n, line in enumerate(lines, 1)
               if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise GenerateError(f"{option} {path} has no prompts (blank lines and #comments are skipped)")
    return prompts


def count_tokens(tokenizer, prompt, max_length):
    """(tokens in the prompt, special tokens included; the text truncation to `max_length` drops, or '')."""
    content = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    specials = tokenizer.num_special_tokens_to_add()
    dropped = tokenizer.decode(content[max_length - specials:]) if len(content) + specials > max_length else ""
    return len(content) + specials, dropped


def check_prompt(tokenizer, prompt, where, max_length):
    """The one check of a prompt against the model's tokenizer, for generate.py and app.py: a GenerateError for a
    prompt with no tokens; for one longer than `max_length` tokens, the warning to show (both token counts and the
    words truncation drops); else None. `where` names the prompt ("line 3 of prompts.txt", "the description")."""
    n_tokens, dropped = count_tokens(tokenizer, prompt, max_length)
    if n_tokens == tokenizer.num_special_tokens_to_add():
        raise GenerateError(f"{where} is empty once tokenized ({prompt!r} has no characters the tokenizer reads)")
    if dropped:
        dropped = dropped if len(dropped) <= 60 else dropped[:57] + "..."
        return (f"{where} is {n_tokens} tokens long; the model reads the first {max_length} "
                f"(config.max_text_length), so it ignores: {dropped!r}")
    return None


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


def check_output_folder(out, option="--output_dir"):
    """Create `out` and write a probe file into it (write_probe), so an unwritable folder fails before the slow part."""
    try:
        write_probe(out)
    except OSError as e:
        raise GenerateError(f"cannot write to {option} {out}: {e.strerror or e}")


# Copied from prepare_dataset.py: write_probe (a Space ships generate.py without prepare_dataset.py and `datasets`)
def write_probe(folder, create=True):
    """Write and remove a temporary file in `folder`; OSError, its `filename` the folder, when that fails.

    The one write probe of an output folder in this project, run before any slow work: prepare_dataset.py's
    output, train_accelerate.py's output_dir (pre-flight), generate.py's and evaluate_model.py's output folders
    (generate.check_output_folder). It lives in prepare_dataset.py; generate.py, which a Space ships without that
    module, holds a marked copy kept equal by tests/test_copies.py. A real write, which also catches read-only
    file systems, full disks and a file where a folder should be.

    create=True makes `folder` and its parents first (a folder the command writes into); create=False makes
    nothing and probes the nearest existing folder at or above `folder` (an output that appears by a rename).
    Returns the folder that was written in.
    """
    folder = Path(folder)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    else:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:  # named after the folder, not the random file name
        raise OSError(e.errno, e.strerror or str(e), str(folder)) from None
    return folder


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


def uses_guidance(model):
    """True when the model samples in steps with classifier-free guidance (guidance_scale and num_inference_steps
    apply). A model runs the modeling code saved with it, and models saved before `uses_guidance` existed lack it:
    for those, every generator but the one-pass decoder samples that way."""
    return getattr(model, "uses_guidance", model.config.generator_type != "decoder")


def sampling_options(model, **options):
    """The sampling keywords for `model.generate` that were given (not None); a GenerateError when one is newer than
    the code saved with the model (a model runs its own modeling file), instead of a TypeError midway."""
    given = {name: value for name, value in options.items() if value is not None}
    known = inspect.signature(model.generate).parameters
    for name in given:
        if name not in known:
            raise GenerateError(f"--{name}: the code saved with the model {model.name_or_path} predates it; save the "
                                f"model again with this checkout's code to use it: python -c \"from modeling_pokesprite "
                                f"import PokeSpriteModel as M; M.from_pretrained('PATH').save_pretrained('PATH')\"")
    return given


def progress_option(method, progress_bar):
    """{"progress_bar": progress_bar} when the model's `method` (generate, or the model itself) takes it, else {}:
    a model runs the code saved with it, which may predate the progress bar."""
    return {"progress_bar": progress_bar} if "progress_bar" in inspect.signature(method).parameters else {}


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
    except SafetensorError as e:  # a damaged or half-copied weights file: its header does not parse
        raise GenerateError(damaged_weights_message(name, revision, e))
    except (OSError, ValueError) as e:
        raise GenerateError(f"cannot load the model {name}: {str(e).strip().splitlines()[0]}")
    model.tokenizer = tokenizer
    return model.to(pick_device(device)).eval()


def damaged_weights_message(name, revision, error):
    """One line naming the weights file of `name` whose header safetensors cannot read, and what to do."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(name).exists():
        files = sorted(Path(name).glob("*.safetensors"))
    else:  # a Hub model: the copy in the local cache is the one that failed
        cached = try_to_load_from_cache(name, "model.safetensors", revision=revision)
        files = [Path(cached)] if isinstance(cached, str) else []
    damaged = []
    for path in files:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            damaged.append(str(path))
    where = ", ".join(damaged) if damaged else f"a weights file of {name}"
    return (f"cannot load the model {name}: {where} is not a readable safetensors file ({reason}); "
            f"it is damaged or incompletely copied: copy, download or save it again")


def main(argv=None):
    args = parse_args(argv)
    prompts = read_prompts(args)
    out = Path(args.output_dir)
    check_output_folder(out, flag(args, "output_dir"))
    pick_device(args.device)  # a bad --device fails before the model loads, too
    model = load_model(args.model, args.revision, args.device)
    for prompt, where in prompts:
        warning = check_prompt(model.tokenizer, prompt, where, model.config.max_text_length)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    # the sprites and the attention figure are sampled the same way; None: the model's config says
    sampling = {}
    if uses_guidance(model):
        sampling = sampling_options(model, guidance_scale=args.guidance_scale,
                                    num_inference_steps=args.num_inference_steps, eta=args.eta, flow_shift=args.flow_shift,
                                    epsilon_scaling=args.epsilon_scaling)
    elif any(value is not None for value in (args.guidance_scale, args.num_inference_steps, args.eta, args.flow_shift,
                                             args.epsilon_scaling)):
        print(f"warning: {flag(args, 'guidance_scale')}, {flag(args, 'num_inference_steps')}, --eta, --flow_shift and "
              f"--epsilon_scaling apply to "
              f"models that sample in steps with guidance; this {model.config.generator_type} model "
              f"makes a sprite in one pass, so they are ignored", file=sys.stderr)
    options = progress_option(model.generate, args.progress)
    num = args.num_images_per_prompt

    written, grid = [], []
    width = max(2, len(str(num - 1)))
    columns = min(num, GRID_MAX_COLUMNS)
    for row, ((prompt, _), slug) in enumerate(zip(prompts, unique_slugs([p for p, _ in prompts]))):
        # a fresh generator per prompt: its sprites do not depend on the other prompts of the run
        generator = torch.Generator().manual_seed(args.seed)
        shown = []  # this prompt's sprites for grid.png: the first `columns`, copied out of their batch
        for start in range(0, num, args.batch_size):  # --batch_size at a time, each written before the next
            count = min(args.batch_size, num - start)
            sprites = model.generate([prompt], num_images_per_prompt=count, generator=generator, **sampling, **options).cpu()
            for i, sprite in enumerate(sprites, start):
                path = out / f"{slug}-{i:0{width}d}.png"
                to_pil_image((sprite * 255).round().to(torch.uint8)).save(path)
                written.append(path)
            if row < GRID_MAX_ROWS and start < columns:
                shown.append(sprites[: columns - start].clone())
            if num > args.batch_size:
                print(f"  {start + count}/{num} sprites written", file=sys.stderr)
            del sprites
        if shown:
            grid.append(torch.cat(shown))
        print(f"{prompt!r}: {num} sprites -> {out / slug}-*.png")
        if args.attention:
            path = out / f"{slug}-attention.png"
            words = save_attention_maps(model, prompt, path, seed=args.seed, **sampling,
                                        **progress_option(model.forward, args.progress))
            written.append(path)
            print(f"  attention over {len(words)} tokens -> {path}")
    path = out / "grid.png"
    sprite_grid(torch.cat(grid), nrow=columns).save(path)
    written.append(path)
    print(f"grid ({len(grid)} of {len(prompts)} prompts x {columns} of {num} sprites) -> {path}")
    return written


if __name__ == "__main__":
    try:
        main()
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

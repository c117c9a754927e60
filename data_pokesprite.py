"""The data side of training: a prepared dataset as tensors on the device, and the augmentation.

    splits = load_splits("data/pokesprite")                  # prepare_dataset.py's output folder, or a Hub id
    train = split_to_tensors(splits["train"], tokenizer, config)  # uint8 pixels, token ids, attention masks
    pixels, labels = augment(train["pixels"][idx], hflip=True, max_shift=2, background=0.0)  # floats in [-1, 1]
    pixels, rows = recolour(pixels, idx, train, share=0.5)         # with split_to_tensors(..., recolour=True)
    text = train["input_ids"][rows]                                 # the captions that name the new colours

    write_json("outputs/eval/run/eval.json", metrics)  # whole or not at all: a temporary file renamed into place

train_accelerate.py, evaluate_model.py and benchmarks/bench_train.py read their data through these. Sprites of
another size than the model's are fitted by prepare_dataset.fit_sprite, the rule prepare_dataset.py applies. Every
script that leaves a JSON table (the trainer, evaluate_model.py, scripts/, benchmarks/) writes it with write_json.
"""

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modeling_pokesprite import AUGMENT_LABELS
from prepare_dataset import fit_sprite
from settings_pokesprite import PreflightError


def load_splits(name):
    """A prepared DatasetDict from a folder (`load_from_disk`) or the Hub (`load_dataset`)."""
    from datasets import load_dataset, load_from_disk

    hint = (
        f"Make one with: python prepare_dataset.py --csv data/pokemon.csv --images data/small_images --output {name}"
        f" (or --synthetic 512 --output {name} for a quick start)"
    )
    path = Path(name)
    # "data/pokesprite" could also be a Hub id; if "data/" is a local folder it is a missing local dataset, and
    # asking the Hub (about half a minute of retries offline) would only delay the hint
    if not path.exists() and (path.is_absolute() or name.startswith(".") or path.parent.is_dir() and path.parent != Path(".")):
        raise PreflightError(f"dataset folder {name} does not exist. {hint}")
    if path.exists():
        try:
            splits = load_from_disk(name)
        except FileNotFoundError:
            raise PreflightError(f"dataset folder {name} is not a prepared dataset. {hint}")
    else:
        try:
            splits = load_dataset(name)
        except Exception as e:  # the Hub's errors vary by cause; all mean "no such dataset" here
            raise PreflightError(f"dataset {name!r} is neither a folder nor a reachable Hub dataset ({type(e).__name__}). {hint}")
    for split in ("train", "validation"):
        if split not in splits:
            raise PreflightError(f"dataset {name} has no '{split}' split (it has {list(splits)}). {hint}")
        missing = {"image", "text"} - set(splits[split].column_names)
        if missing:
            raise PreflightError(f"dataset {name} split '{split}' lacks column(s) {sorted(missing)}. {hint}")
    return splits


def on_white(array):
    """An (H, W, 4) uint8 RGBA sprite as (H, W, 3) uint8 RGB composited onto white, as the sprites are shown: what a
    3-channel model trains on."""
    alpha = array[..., 3:4].astype(np.float32) / 255
    return (array[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)


# The colour names a sprite can be recoloured to and from, and the median hue (degrees), saturation and value of the
# sprite pixels (alpha > 0.5; the hue of those with saturation > 0.25 and value > 0.3) of the 669 training Pokémon of
# each colour. The other PokéAPI colours (black, brown, gray, white) are told apart by value and saturation, not hue:
# their sprites keep their colours.
COLOUR_HSV = {"red": (13, 0.44, 0.75), "yellow": (46, 0.41, 0.81), "green": (99, 0.36, 0.70),
              "blue": (200, 0.34, 0.73), "purple": (254, 0.22, 0.67), "pink": (352, 0.22, 0.86)}


def colour_captions(split):
    """The captions of recoloured sprites: each recolourable sprite's caption with the first whole word naming its
    `color` swapped for each name of COLOUR_HSV in turn (K = len(COLOUR_HSV) captions a sprite).

    A sprite is recolourable when its colour is in COLOUR_HSV and its caption names it. Returns those captions, each
    sprite's colour as an index into COLOUR_HSV (-1: never recoloured), and an (N, K) table of where the caption of
    sprite n in colour k is among `split["text"] + captions`: its own row n where it is never recoloured.
    """
    columns = split.column_names if hasattr(split, "column_names") else list(split)
    if "color" not in columns:
        raise PreflightError("recolouring needs each sprite's colour name, and the dataset has no 'color' column "
                             f"(it has {columns}); set data.recolour to 0, or add the column to the CSV")
    names, n = list(COLOUR_HSV), len(split["text"])
    words = {name: re.compile(rf"\b{name}\b") for name in names}  # whole words: "red" is not the start of "reddish"
    captions, colours, rows = [], [], []
    for i, (text, color) in enumerate(zip(split["text"], split["color"])):
        word = words.get(color)
        if word is None or word.search(text) is None:
            colours.append(-1)
            rows.append([i] * len(names))
            continue
        colours.append(names.index(color))
        rows.append(list(range(n + len(captions), n + len(captions) + len(names))))
        captions += [word.sub(name, text, count=1) for name in names]
    return captions, torch.tensor(colours), torch.tensor(rows, dtype=torch.long).reshape(n, len(names))


def split_pixels(split, size, num_channels):
    """(N, C, size, size) uint8 sprites of a prepared split: RGBA (C = 4) or RGB on white (C = 3), each fitted as
    prepare_dataset.py fits one (fit_sprite: padded, not stretched)."""
    pixels = []
    for image in split["image"]:
        array = np.asarray(fit_sprite(image.convert("RGBA"), size))
        pixels.append(on_white(array) if num_channels == 3 else array)
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()


def split_to_tensors(split, tokenizer, config, recolour=False):
    """Decode every sprite and tokenise every caption once: (N, C, H, W) uint8 pixels and padded token ids.

    The pixels are split_pixels' at `config.image_size` and `config.num_channels`. Captions are padded to the
    split's longest (at most `max_text_length`), not always to `max_text_length`: padding is masked everywhere, so
    the result is the same, but short captions (a user's one-liners, the synthetic creatures' 16 tokens) then cost
    the token transformer and every cross-attention a third of the work.

    With `recolour`, the token ids (and masks) also hold colour_captions' captions after the N own ones, for
    `recolour()`: "colour" is each sprite's colour index, "colour_rows" the row of its caption in each colour, and
    "colour_hsv" COLOUR_HSV's medians as a (K, 3) tensor, moved to the device with the rest.
    """
    pixels = split_pixels(split, config.image_size, config.num_channels)
    captions, tensors = list(split["text"]), {"pixels": pixels}
    if recolour:
        if config.num_channels != 4:
            raise PreflightError("recolouring needs RGBA sprites (num_channels 4): on white, the background cannot be "
                                 "told from the white parts of a sprite; set data.recolour to 0")
        recoloured, tensors["colour"], tensors["colour_rows"] = colour_captions(split)
        tensors["colour_hsv"] = torch.tensor(list(COLOUR_HSV.values()))
        captions += recoloured
    text = tokenizer(captions, padding="longest", truncation=True, max_length=config.max_text_length, return_tensors="pt")
    return {**tensors, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}


def augment(pixels, hflip, max_shift, background):
    """uint8 sprites on the device -> floats in [-1, 1], each flipped and shifted by whole pixels at random, and
    what was done to each: labels (B, 3) of the flip (1 or 0) and the x and y shifts as shares of max_shift
    (in [-1, 1]), all zero for an untouched sprite. A model with `augment_conditioning` reads them.

    Only geometry changes: colour is part of what the caption says. Shifted-in pixels are the background
    (transparent for RGBA, white for RGB).
    """
    x = pixels.float() / 255
    b = x.shape[0]
    labels = torch.zeros(b, AUGMENT_LABELS, device=x.device)
    if hflip:
        flip = torch.rand(b, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        labels[:, 0] = flip.float()
    if max_shift > 0:
        steps = torch.randint(-max_shift, max_shift + 1, (b, 2), device=x.device).float()
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, :, 2] = steps * 2 / x.shape[-1]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x - background, grid, mode="nearest", padding_mode="zeros", align_corners=False) + background
        labels[:, 1:] = steps / max_shift
    return x * 2 - 1, labels


def recolour(pixels, idx, tensors, share):
    """Recolour a random `share` of a batch to a colour name drawn from COLOUR_HSV, shiny-Pokémon style: the same
    creature, its hue turned and its saturation and value scaled from its own colour's medians to the new one's.
    A creature's shape is then learnt from its description, apart from the colour its caption names.

    `pixels`: the batch (augment's floats in [-1, 1], RGBA); `idx`: their sprites' indices; `tensors`: the split
    from split_to_tensors(..., recolour=True). Returns the pixels and the rows of that split's token ids to train
    them with: the own caption (idx), or the caption naming the new colour. Alpha is kept.
    """
    own, medians = tensors["colour"][idx], tensors["colour_hsv"]
    chosen = (torch.rand(len(idx), device=pixels.device) < share) & (own >= 0)
    new = torch.randint(len(medians), (len(idx),), device=pixels.device)
    rows = torch.where(chosen, tensors["colour_rows"][idx, new], idx)
    # only the chosen sprites are turned: at a share of 0.2 the HSV round trip of the other four fifths would be wasted
    picked = chosen.nonzero().squeeze(1)
    src, dst = medians[own[picked]][:, :, None, None], medians[new[picked]][:, :, None, None]
    rgb = (pixels[picked, :3] + 1) / 2
    value, largest = rgb.max(1, keepdim=True)
    chroma = value - rgb.min(1, keepdim=True).values
    r, g, b = rgb.split(1, dim=1)
    c = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(largest == 0, ((g - b) / c) % 6, torch.where(largest == 1, (b - r) / c + 2, (r - g) / c + 4))
    hue = (hue + (dst[:, 0:1] - src[:, 0:1]) / 60) % 6  # in sixths of the circle
    saturation = (chroma / value.clamp(min=1e-6) * dst[:, 1:2] / src[:, 1:2]).clamp(0, 1)
    value = (value * dst[:, 2:3] / src[:, 2:3]).clamp(0, 1)
    # HSV back to RGB: channel = value * (1 - saturation * clamp(min(j, 4 - j), 0, 1)), j = (m + hue) mod 6
    j = (torch.tensor([5.0, 3.0, 1.0], device=pixels.device)[None, :, None, None] + hue) % 6
    turned = value * (1 - saturation * torch.minimum(j, 4 - j).clamp(0, 1))
    pixels = pixels.clone()
    pixels[picked, :3] = turned * 2 - 1
    return pixels, rows


def write_json(path, obj):
    """`obj` as indented JSON at `path`, written beside it first and renamed into place: an interrupted run leaves the
    previous file or none, never half a table that a later script would read."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)

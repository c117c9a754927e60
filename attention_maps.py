"""Pictures of what a PokeSprite model made and where it looked: sprite grids and per-word attention heatmaps.

The trainer, `generate.py`, `app.py` and `evaluate_model.py` all draw through these functions.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.utils import make_grid


def on_white(images):
    """(B, C, H, W) in [0, 1] -> RGB on a white background (alpha-composited when C is 4).

    The one rule for showing a sprite with alpha. It lives in attention_maps.py, whose grids and figures generate.py,
    app.py, the trainer and evaluate_model.py draw with; each metrics/ module, which evaluate loads as a single
    file, holds a copy marked `# Copied from attention_maps.py: on_white`, kept equal by tests/test_copies.py.
    """
    if images.shape[1] == 3:
        return images
    rgb, alpha = images[:, :3], images[:, 3:4]
    return rgb * alpha + (1 - alpha)


def sprite_grid(images, nrow=8, scale=2):
    """Sprites (B, C, H, W) in [0, 1] -> one PIL image, on white, each sprite upscaled `scale` times (nearest)."""
    images = on_white(images.float().cpu())
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def token_heatmaps(attentions, image_size):
    """Cross-attention weights -> one heatmap per token at `image_size`, averaged over layers.

    `attentions` is the model's tuple of `(batch, h*w, text_length)` weights; layers at different resolutions are
    upsampled to `image_size` before averaging. Returns `(batch, text_length, image_size, image_size)`, each map
    scaled to [0, 1] on its own so that faint words still show where they look.
    """
    maps = []
    for weights in attentions:
        b, hw, t = weights.shape
        side = int(round(hw**0.5))
        grid = weights.float().transpose(1, 2).reshape(b, t, side, side)
        maps.append(F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=False))
    maps = torch.stack(maps).mean(0)
    low = maps.amin(dim=(2, 3), keepdim=True)
    high = maps.amax(dim=(2, 3), keepdim=True)
    return (maps - low) / (high - low).clamp(min=1e-8)


def words_of(tokenizer, input_ids, attention_mask):
    """The tokens a heatmap panel is labelled with, for one caption (valid positions only)."""
    ids = input_ids[attention_mask.bool()].tolist()
    return tokenizer.convert_ids_to_tokens(ids)


def attention_figure(sprite, heatmaps, words, scale=2):
    """One sprite and one panel per word: the sprite, greyed, under a red heatmap, with the word written below.

    `sprite` is (C, H, W) in [0, 1]; `heatmaps` is (T, H, W) in [0, 1] with T >= len(words). Returns a PIL image.
    """
    base = on_white(sprite[None].float().cpu())[0]
    grey = base.mean(0, keepdim=True).expand(3, -1, -1) * 0.6 + 0.4
    size = sprite.shape[-1] * scale
    label_h, cols = 14, min(len(words) + 1, 8)
    rows = (len(words) + 1 + cols - 1) // cols
    figure = Image.new("RGB", (cols * (size + 4), rows * (size + label_h + 4)), "white")
    draw = ImageDraw.Draw(figure)
    panels = [(base, "sprite")]
    for heat, word in zip(heatmaps.float().cpu(), words):
        red = torch.stack([torch.ones_like(heat), 1 - heat, 1 - heat])
        panels.append((grey * 0.5 + red * 0.5, word))
    for i, (panel, label) in enumerate(panels):
        x, y = (i % cols) * (size + 4), (i // cols) * (size + label_h + 4)
        up = F.interpolate(panel[None], size=(size, size), mode="nearest")[0]
        figure.paste(Image.fromarray((up.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)), (x, y))
        draw.text((x + 2, y + size + 1), label[:12], fill="black")
    return figure


@torch.no_grad()
def attention_for_prompt(model, prompt, seed=0, **sampling):
    """Generate one sprite for `prompt` and return (sprite in [0, 1], per-token heatmaps, words).

    Uses `model(..., output_attentions=True)`, so it works for all generator types: the decoder's attention in
    its one pass, an iterative generator's averaged over the sampling steps. `sampling` (guidance_scale,
    num_inference_steps, eta, flow_shift, epsilon_scaling) goes to the sampler, as in `model.generate`.

    The prompt is tokenised by `model.tokenize`, as `model.generate` tokenises it, and the panels are labelled with
    `model.tokenizer`'s tokens.
    """
    input_ids, attention_mask = model.tokenize([prompt])
    noise = model.make_noise(1, torch.Generator().manual_seed(seed))
    output = model(input_ids, attention_mask, noise=noise, output_attentions=True, **sampling)
    sprite = ((output.images[0].float() + 1) / 2).clamp(0, 1)
    words = words_of(model.tokenizer, input_ids[0], attention_mask[0])
    heatmaps = token_heatmaps(output.attentions, model.config.image_size)[0, : len(words)]
    return sprite, heatmaps, words


def save_attention_maps(model, prompt, path, seed=0, **sampling):
    """Write the attention figure of `prompt` to `path` (PNG); returns the words, one panel each after the sprite."""
    sprite, heatmaps, words = attention_for_prompt(model, prompt, seed, **sampling)
    attention_figure(sprite, heatmaps, words).save(path)
    return words

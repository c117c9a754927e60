"""Per-prompt diversity: how different the sprites generated from one prompt with different seeds are."""
import contextlib

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F

_DESCRIPTION = """\
Mean pairwise distance between sprites generated from the same prompt (different seeds).

Sprites are grouped by `group_ids` (one id per sprite: the prompt, or its index). Within each group of
k >= 2 sprites, every unordered pair (i, j) is compared, on RGB composited onto white:
- `diversity`: mean absolute pixel difference |x_i - x_j| over pixels and channels. Range [0, 1]:
  0 = all sprites of a prompt are identical (mode collapse, or the seed is ignored), 1 = black vs white.
- `feature_diversity`: Euclidean distance between the sprite-v1 features of metrics/frechet (colour
  histogram, 8x8 layout, edge-orientation energy; deterministic, no weights). Range [0, inf); it is less
  sensitive than pixels to a sprite merely moving by a few pixels.
Each group's mean over its pairs is computed first and groups are then averaged with equal weight, so a
prompt with many samples does not dominate. Groups of one sprite are ignored.

What good looks like: well above 0, and of the order of the spread between *different* real sprites
(reference, all pairs of the 836 real Pokémon sprites: diversity 0.19, feature_diversity 27.3). Values near
0 mean the seed does not change the output. Pixel diversity also rewards noise (uniform-noise images:
diversity 0.33), feature diversity does not (noise images share one colour/edge statistic:
feature_diversity 7.9); read both next to a quality metric (metrics/frechet).

Limits: pixel distance is not perceptual (a one-pixel shift of a detailed sprite counts as different);
there is no LPIPS offline, feature_diversity is the shift-tolerant stand-in. Cost is quadratic in the
group size (fine for a few dozen seeds per prompt). Images are float arrays in [0, 1] of shape
(N, C, 64, 64), C = 3 (RGB) or 4 (RGBA, composited onto white).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated sprites, float array/tensor (N, C, 64, 64) in [0, 1], C = 3 or 4.
    group_ids: N ids (all str, e.g. the prompts, or all int), equal for sprites made from the same prompt.
Returns:
    diversity (`float`): mean pairwise mean-absolute pixel difference, averaged over groups.
    feature_diversity (`float`): mean pairwise Euclidean distance of sprite-v1 features, averaged over groups.
    num_groups (`int`): groups with at least 2 sprites (the ones averaged).
    num_images (`int`): sprites in those groups.
Examples:
    >>> diversity = evaluate.load("metrics/diversity")
    >>> diversity.compute(predictions=images, group_ids=[0, 0, 0, 0, 1, 1, 1, 1])["diversity"]
"""

# Copied from metrics/frechet/frechet.py: COLOUR_WEIGHT, LAYOUT_WEIGHT, EDGE_WEIGHT, FEATURE_BATCH
COLOUR_WEIGHT = 26.4
LAYOUT_WEIGHT = 5.1
EDGE_WEIGHT = 175.6
FEATURE_BATCH = 256
PAIR_CHUNK = 256  # image pairs compared per step: bounds memory at PAIR_CHUNK x 12288 floats


# helpers


# Copied from attention_maps.py: on_white (evaluate loads one file per module, so there is no shared import)
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


# Copied from metrics/frechet/frechet.py: composite_on_white
def composite_on_white(images):
    """(N, 3, H, W) float32 CPU tensor from (N, C, H, W) / (C, H, W) images in [0, 1], or a list of them.

    C = 4 is RGBA with alpha last and is composited onto white; C = 3 is used as is.
    """
    if isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.dtype == object):
        if len(images) == 0:
            raise ValueError("Expected at least one image, got an empty list.")
        return torch.cat([composite_on_white(np.asarray(image, dtype=np.float32)) for image in images])
    x = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (3, 4):
        raise ValueError(f"Expected images of shape (N, C, H, W) with C = 3 or 4, got {tuple(x.shape)}.")
    if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(
            f"Expected pixel values in [0, 1], got min {x.min():.3f} and max {x.max():.3f}; "
            "map [-1, 1] outputs with (x + 1) / 2 and uint8 with x / 255."
        )
    return on_white(x.clamp(0, 1))


# Copied from metrics/frechet/frechet.py: _sprite_features_batch
def _sprite_features_batch(rgb):
    n = rgb.shape[0]
    # colour: 4x4x4 histogram; sqrt makes Euclidean distance the Hellinger distance between histograms
    level = (rgb * 4).long().clamp_(max=3)
    bins = (level[:, 0] * 16 + level[:, 1] * 4 + level[:, 2]).flatten(1)
    hist = torch.zeros(n, 64).scatter_add_(1, bins, torch.ones_like(bins, dtype=torch.float32))
    colour = (hist / bins.shape[1]).sqrt()

    # layout as "ink" (1 - RGB) so the white background is 0 and the mean feature stays small for KID's kernel
    layout = 1 - F.adaptive_avg_pool2d(rgb, 8).flatten(1)

    # edges: replicate padding so the canvas border is not an edge
    luma = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None]
    luma = F.pad(luma, (1, 1, 1, 1), mode="replicate")
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]
    grad = F.conv2d(luma, kernels)
    magnitude = grad.pow(2).sum(1).sqrt()
    # unsigned orientation in [0, 8) bin units, split linearly between the two nearest bin centres,
    # summed into (4x4 cell, bin) slots with one scatter instead of materialising 8 orientation maps
    position = torch.remainder(torch.atan2(grad[:, 1], grad[:, 0]), torch.pi) / (torch.pi / 8)
    lower = position.floor()
    upper_share = (position - lower).flatten(1)
    lower = lower.long().flatten(1) % 8
    height, width = magnitude.shape[1:]
    rows = torch.arange(height) * 4 // height
    cols = torch.arange(width) * 4 // width
    cell = (rows[:, None] * 4 + cols[None, :]).flatten()
    magnitude = magnitude.flatten(1)
    edges = torch.zeros(n, 16 * 8)
    edges.scatter_add_(1, cell * 8 + lower, magnitude * (1 - upper_share))
    edges.scatter_add_(1, cell * 8 + (lower + 1) % 8, magnitude * upper_share)
    edges = edges / torch.bincount(cell, minlength=16).repeat_interleave(8)

    return torch.cat([COLOUR_WEIGHT * colour, LAYOUT_WEIGHT * layout, EDGE_WEIGHT * edges], dim=1)


# Copied from metrics/frechet/frechet.py: sprite_features
def sprite_features(rgb):
    """(N, 384) float64 tensor of sprite-v1 features of (N, 3, H, W) RGB images in [0, 1]."""
    return torch.cat([_sprite_features_batch(chunk) for chunk in rgb.split(FEATURE_BATCH)]).double()


def group_pairs(group_ids):
    """(first, second, pair_group) index tensors over every unordered pair of sprites sharing a group id."""
    _, group_index = np.unique(np.asarray(group_ids).reshape(-1), return_inverse=True)
    first, second, pair_group = [], [], []
    for group in range(group_index.max() + 1):
        members = torch.from_numpy(np.flatnonzero(group_index == group))
        if len(members) < 2:
            continue
        upper = torch.triu_indices(len(members), len(members), offset=1)
        first.append(members[upper[0]])
        second.append(members[upper[1]])
        pair_group.append(torch.full((upper.shape[1],), len(pair_group)))
    if not first:
        raise ValueError("Diversity needs at least one group_id shared by 2 or more sprites.")
    return torch.cat(first), torch.cat(second), torch.cat(pair_group)


def mean_pair_distance_per_group(vectors, first, second, pair_group, distance):
    """Mean of distance(vectors[first], vectors[second]) over each group's pairs, one value per group."""
    per_pair = torch.cat(
        [distance(vectors[a] - vectors[b]) for a, b in zip(first.split(PAIR_CHUNK), second.split(PAIR_CHUNK))]
    )
    return torch.bincount(pair_group, weights=per_pair.double()) / torch.bincount(pair_group)


# Copied from metrics/frechet/frechet.py: single_threaded
@contextlib.contextmanager
def single_threaded():
    """Run torch single-threaded. Sprite-sized tensors gain little from intra-op threads, and on a shared CPU
    (dataloader workers, other jobs) every threaded op waits for a second core: measured on a busy 2-core
    machine, a 384x384 eigh took 1-3 s instead of 0.05 s, and diversity on 7 sprites 0.65 s instead of 0.06 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# metric


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Diversity(evaluate.Metric):
    def _info(self):
        image = datasets.Array3D(shape=(None, 64, 64), dtype="float32")
        info = evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            # two accepted layouts: evaluate picks the first whose types match (it refuses ints for a string)
            features=[
                datasets.Features({"predictions": image, "group_ids": datasets.Value("string")}),
                datasets.Features({"predictions": image, "group_ids": datasets.Value("int64")}),
            ],
        )
        # evaluate refuses format="numpy" unless every feature is a Value (ragged Sequences would come back as
        # object arrays). Array3D rows come back as one dense ndarray, which saves ~2 s and ~0.5 GB per 1000
        # sprites over the default round trip through Python lists, so it is set after the check.
        info.format = "numpy"
        return info

    @single_threaded()
    def _compute(self, predictions, group_ids):
        rgb = composite_on_white(predictions)
        first, second, pair_group = group_pairs(group_ids)
        pixel = mean_pair_distance_per_group(
            rgb.flatten(1), first, second, pair_group, lambda diff: diff.abs().mean(1)
        )
        feature = mean_pair_distance_per_group(
            sprite_features(rgb), first, second, pair_group, lambda diff: diff.norm(dim=1)
        )
        return {
            "diversity": pixel.mean().item(),
            "feature_diversity": feature.mean().item(),
            "num_groups": len(pixel),
            "num_images": len(torch.cat([first, second]).unique()),
        }

"""Fréchet distance and KID between generated and real sprites, in a feature space built offline."""
import contextlib

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F

_CITATION = """\
@inproceedings{heusel2017gans,
  title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium},
  author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and Hochreiter, Sepp},
  booktitle={NeurIPS}, year={2017}
}
@inproceedings{binkowski2018demystifying,
  title={Demystifying MMD GANs},
  author={Binkowski, Mikolaj and Sutherland, Dougal J. and Arbel, Michael and Gretton, Arthur},
  booktitle={ICLR}, year={2018}
}
"""

_DESCRIPTION = """\
Distribution distance between generated sprites (`predictions`) and real sprites (`references`).

Both sets are mapped to feature vectors; then
- `frechet_distance` fits a Gaussian to each set and returns
  ||mu_p - mu_r||^2 + Tr(S_p + S_r - 2 (S_p S_r)^(1/2)). Range [0, inf); 0 = same mean and covariance.
- `kid` is the unbiased MMD^2 estimate with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
  averaged over `kid_subsets` random subsets of `kid_subset_size` per set (fixed seed, so repeatable);
  `kid_std` is its spread over subsets (0 when a subset is the whole of both sets).
  Unbiased, so it can come out slightly negative when the sets match; lower is better. It assumes two
  independent samples: one set passed as both gives a small negative value (-0.12 for the 836 real sprites).

Feature space (default, `feature_space == "sprite-v1"`): hand-crafted, no weights, no randomness, so it is
the same on every machine and every run. 384 numbers per sprite, from RGB composited onto white:
- colour (64): sqrt of the 4x4x4 RGB histogram over all pixels (Hellinger embedding), background included,
  so it also sees how much of the canvas the creature fills;
- layout (192): the image average-pooled to 8x8 RGB, as ink 1 - RGB (silhouette, where the colours sit);
- edges (128): gradient energy (Sobel on luma) in 8 unsigned orientations, pooled over a 4x4 grid of cells
  (outlines, texture and sharpness: blurry samples have little gradient energy).
Each block is multiplied by a fixed weight so that the three carry equal total variance over the 836 real
Pokémon sprites (weights below); the sum of per-dimension variances there is about 384.

With `inception_weights=PATH` (a torchvision `inception_v3` state_dict), the 2048-d pool features of that
network are used instead (sprites resized to 299x299, scaled to [-1, 1] as torchvision's IMAGENET1K_V1
weights expect). Even then the numbers are not comparable to published FID, which uses the TF-ported
Inception of pytorch-fid / clean-fid and 50k samples.

Reference values (sprite-v1) from the 836 real sprites split into random halves of 418:
  half vs half: frechet_distance 60, kid -0.01 (the floor: same distribution);
  half blurred (Gaussian sigma 1.5) vs the other half: frechet_distance 98, kid 2.7;
  half with RGB channels rotated vs the other half: frechet_distance 148, kid 3.7;
  uniform noise vs real: frechet_distance 1990, kid 441.
  At 100 vs 100 the same comparisons give frechet_distance 193 (halves) vs 201 (blurred), while kid
  still separates them (0.006 vs 2.5): at that size, read kid.

Limits:
- sprite-v1 is not FID: it only sees colour, coarse layout and edge statistics, not "is this a creature".
  Numbers compare runs of this module with the same feature space, nothing else.
- Fréchet distance is biased upward with few samples (the covariance of 384 dims from a few hundred
  sprites is noisy): compare only at equal sample sizes. KID is unbiased and is the better figure for a
  few hundred images.
- evaluate stores `predictions` and `references` as rows of one table, so pass the same number of each
  (subsample the larger set).
- Cost: sprite-v1 features take about 1 ms per sprite (1000 vs 1000 sprites: 2.5 s in all, on one busy
  CPU core). Inception runs at 299x299, of the order of a second per sprite on CPU: pass `device="cuda"`
  for more than a few dozen.
- Images are float arrays in [0, 1] of shape (N, C, 64, 64), C = 3 (RGB) or 4 (RGBA, composited onto white).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated sprites, float array/tensor (N, C, 64, 64) in [0, 1], C = 3 or 4.
    references: real sprites, same shape rules, same N.
    inception_weights (`str`, optional): path to a torchvision `inception_v3` state_dict; uses its 2048-d
        pool features instead of sprite-v1.
    device (`str`, optional): where the Inception network runs (default CPU); sprite-v1 always runs on CPU.
    kid_subsets (`int`, default 100) and kid_subset_size (`int`, default 1000): KID subsets.
    seed (`int`, default 0): seed for drawing the KID subsets.
Returns:
    frechet_distance (`float`), kid (`float`), kid_std (`float`), feature_space (`str`),
    num_predictions (`int`), num_references (`int`).
Examples:
    >>> frechet = evaluate.load("metrics/frechet")
    >>> frechet.compute(predictions=generated, references=real)["kid"]
"""

# Block weights of sprite-v1: equal total variance per block over the 836 real sprites (see _DESCRIPTION).
COLOUR_WEIGHT = 26.4
LAYOUT_WEIGHT = 5.1
EDGE_WEIGHT = 175.6
FEATURE_BATCH = 256


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


def sprite_features(rgb):
    """(N, 384) float64 tensor of sprite-v1 features of (N, 3, H, W) RGB images in [0, 1]."""
    return torch.cat([_sprite_features_batch(chunk) for chunk in rgb.split(FEATURE_BATCH)]).double()


def load_inception(weights_path, device=None):
    """torchvision inception_v3 with the state_dict at `weights_path`, returning 2048-d pool features."""
    import torchvision

    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    model.fc = torch.nn.Identity()
    return model.eval().to(device)


@torch.no_grad()
def inception_features(rgb, model, device=None):
    """(N, 2048) float64 tensor of Inception pool features of (N, 3, H, W) RGB images in [0, 1]."""
    features = []
    for chunk in rgb.split(32):
        # IMAGENET1K_V1 runs with transform_input=True on ImageNet-normalised input, which is x * 2 - 1
        x = F.interpolate(chunk.to(device), size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        features.append(model(x).cpu())
    return torch.cat(features).double()


def frechet_distance(features_a, features_b):
    """Fréchet distance between Gaussians fitted to two (N, D) float64 feature tensors."""
    n_a, n_b, dim = len(features_a), len(features_b), features_a.shape[1]
    # S_a = A^T A and S_b = B^T B with A, B the centred features over sqrt(N - 1)
    a = (features_a - features_a.mean(0)) / (n_a - 1) ** 0.5
    b = (features_b - features_b.mean(0)) / (n_b - 1) ** 0.5
    if n_a * n_b * min(n_a, n_b) < dim**3:
        # Tr((S_a S_b)^(1/2)) = sum of singular values of A B^T (the nonzero eigenvalues of S_a S_b are those
        # of A B^T B A^T): exact, and far cheaper than D x D eigendecompositions when N < D (Inception, 2048-d)
        trace_sqrt = torch.linalg.svdvals(a @ b.T).sum()
    else:
        # = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric PSD matrix: eigh is stable where
        # scipy's sqrtm of the non-symmetric S_a S_b goes complex on singular covariances
        eigenvalues, eigenvectors = torch.linalg.eigh(a.T @ a)
        sqrt_a = (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
        middle = sqrt_a @ (b.T @ b) @ sqrt_a
        trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    mean_term = (features_a.mean(0) - features_b.mean(0)).pow(2).sum()
    distance = mean_term + a.pow(2).sum() + b.pow(2).sum() - 2 * trace_sqrt
    return max(distance.item(), 0.0)  # rounding can leave -1e-12 for identical sets


def _polynomial_mmd(x, y):
    d = x.shape[1]
    m = x.shape[0]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    same = (k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (m * (m - 1))
    return (same - 2 * k_xy.mean()).item()


def kernel_inception_distance(features_a, features_b, subsets=100, subset_size=1000, seed=0):
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over random equal-size subsets of two feature sets."""
    size = min(len(features_a), len(features_b), subset_size)
    if size < 2:
        raise ValueError("KID needs at least 2 images per set.")
    if size == len(features_a) == len(features_b):
        return _polynomial_mmd(features_a, features_b), 0.0  # every subset would be the whole of both
    generator = torch.Generator().manual_seed(seed)
    values = [
        _polynomial_mmd(
            features_a[torch.randperm(len(features_a), generator=generator)[:size]],
            features_b[torch.randperm(len(features_b), generator=generator)[:size]],
        )
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


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
class Frechet(evaluate.Metric):
    def _info(self):
        image = datasets.Array3D(shape=(None, 64, 64), dtype="float32")
        info = evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": image, "references": image}),
            reference_urls=["https://arxiv.org/abs/1706.08500", "https://arxiv.org/abs/1801.01401"],
        )
        # evaluate refuses format="numpy" unless every feature is a Value (ragged Sequences would come back as
        # object arrays). Array3D rows come back as one dense ndarray, which saves ~2 s and ~0.5 GB per 1000
        # sprites over the default round trip through Python lists, so it is set after the check.
        info.format = "numpy"
        return info

    @single_threaded()
    def _compute(
        self,
        predictions,
        references,
        inception_weights=None,
        device=None,
        kid_subsets=100,
        kid_subset_size=1000,
        seed=0,
    ):
        generated, real = composite_on_white(predictions), composite_on_white(references)
        if len(generated) < 2 or len(real) < 2:
            raise ValueError("Fréchet distance and KID need at least 2 images per set.")
        if inception_weights is None:
            feature_space = "sprite-v1"
            generated, real = sprite_features(generated), sprite_features(real)
        else:
            feature_space = "inception_v3"
            model = load_inception(inception_weights, device)
            generated, real = inception_features(generated, model, device), inception_features(real, model, device)
        kid, kid_std = kernel_inception_distance(generated, real, kid_subsets, kid_subset_size, seed)
        return {
            "frechet_distance": frechet_distance(generated, real),
            "kid": kid,
            "kid_std": kid_std,
            "feature_space": feature_space,
            "num_predictions": len(generated),
            "num_references": len(real),
        }

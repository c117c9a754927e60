"""Every setting of train_accelerate.py, declared once, and how a YAML file and the command line fill them in.

- the model: `PokeSpriteConfig`'s keywords (configuration_pokesprite.py), flat, in the YAML's `model:` block, with
  the names `config.json` uses. `model_name` is the pretrained BERT to start from (flag alias `--text_encoder`).
- training, data and output: the dataclasses below, in the YAML's `training:`, `data:` and `output:` blocks.
- the run itself (`--config`, `--resume`, `--data-stats`, `--use-wandb`): `RunArguments`, on the command line only.

`transformers.HfArgumentParser` makes a flag of every field, `--name` and `--name-with-hyphens`, its help from the
field's metadata. A flag given on the command line wins over the YAML, the YAML over the field's default. An unknown
key in the YAML stops the run. Values are checked when the dataclasses are built (`__post_init__`): a bad one raises
PreflightError, one line that names the flag and the YAML key, before anything loads.

    settings = load_config(parse_args(["--config", "config/cpu.yaml", "--learning_rate", "1e-3"]))
    settings.training.learning_rate, settings.model.generator_type

`load_settings("config/cpu.yaml", generator_type="decoder")` reads a YAML with overrides, as the command line would;
`model_settings("config/cpu.yaml")` gives its model block alone, as `PokeSpriteConfig` keywords (the benchmarks). The
model's flags take their help from `PokeSpriteConfig`'s docstring.
"""

import argparse
import dataclasses
import difflib
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser, SchedulerType

from configuration_pokesprite import GENERATOR_TYPES, LATENT_FLOW_STAGES, PokeSpriteConfig

DEFAULT_CONFIG = Path(__file__).parent / "config" / "train_config.yaml"
INT64_MAX = 2**63 - 1  # counts reach torch as int64
REPORT_TO = ("tensorboard", "wandb", "all", "none")


class PreflightError(Exception):
    """A problem found before training starts; its message is the one line the user sees (exit code 2)."""


def error_summary(error):
    """'Type: first line of the message', for a one-line error."""
    if isinstance(error, pickle.UnpicklingError):  # torch's message goes on to advise weights_only=False: not here
        return f"{type(error).__name__}: holds objects that a weights-only load refuses"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def setting(default=None, help=None, **metadata):
    """A dataclass field with its flag's help (HfArgumentParser reads `help` and `aliases` from the metadata)."""
    return field(default=default, metadata={"help": help, **metadata})


# the checks, shared by the sections' __post_init__


def setting_name(section, key):
    """'--flag (section.key)': how an error names a setting."""
    return f"--{key} ({section}.{key})"


def shown(value):
    """A value as an error message shows it: its repr, cut to 60 characters."""
    try:
        return repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    except ValueError:  # an int of more than 4300 digits
        return "an integer too long to print"


class Checked:
    """`__post_init__` helpers: each returns the value when it is good and raises PreflightError when not."""

    _section = ""

    def _fail(self, key, requirement):
        got = getattr(self, key)
        hint = ""
        if isinstance(got, str):
            try:
                if math.isfinite(float(got)):
                    hint = " (YAML reads a number like 2e-4 as text: write 2.0e-4)"
            except ValueError:
                pass
        raise PreflightError(f"{setting_name(self._section, key)} must be {requirement}, got {shown(got)}{hint}")

    def _integer(self, key, low, high=INT64_MAX, null=None):
        v = getattr(self, key)
        if v is None and null:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            span = f"an integer >= {low}" if high == INT64_MAX else f"an integer from {low} to {high}"
            self._fail(key, span + (f", or null {null}" if null else ""))
        return v

    def _number(self, key, low, low_open=False, high=None, high_open=True):
        v = getattr(self, key)
        try:
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))
        except OverflowError:  # an int beyond float
            ok = False
        ok = ok and (v > low if low_open else v >= low) and (high is None or (v < high if high_open else v <= high))
        if not ok:
            span = f"{'above' if low_open else 'at least'} {low}" + (f" and {'below' if high_open else 'at most'} {high}" if high is not None else "")
            self._fail(key, f"a finite number {span}")
        return v

    def _text(self, key, choices=None, null=False):
        v = getattr(self, key)
        if v is None and null:
            return None
        if choices is not None and v not in choices:
            self._fail(key, "one of " + ", ".join(choices))
        if not isinstance(v, str) or not v.strip():
            self._fail(key, "a non-empty string" + (" or null" if null else ""))
        return v

    def _boolean(self, key, null=False):
        v = getattr(self, key)
        if not isinstance(v, bool) and not (v is None and null):
            self._fail(key, "true or false" + (" or null" if null else ""))
        return v


# the sections


@dataclass
class RunArguments:
    """What this run does; command line only."""

    _argument_group_name = "run (command line only)"

    config: str = setting(str(DEFAULT_CONFIG), "YAML with model:, training:, data: and output: blocks (the flags below override it)")
    resume: str | None = setting(None, "'latest' (newest complete checkpoint in output_dir) or a checkpoint folder")
    data_stats: bool = setting(False, "print dataset statistics and exit")
    use_wandb: bool = setting(False, "also log to Weights & Biases (--report_to all, or wandb)")


@dataclass
class TrainingArguments(Checked):
    """The YAML's `training:` block."""

    _argument_group_name = "training (YAML training:)"
    _section = "training"

    num_epochs: int = setting(100, "epochs to train, unless --max_train_steps is set")
    max_train_steps: int | None = setting(None, "optimizer steps; overrides --num_epochs")
    train_batch_size: int = setting(64, "batch size per process")
    gradient_accumulation_steps: int = setting(1, "batches per optimizer step")
    learning_rate: float = setting(2.0e-4, "AdamW's learning rate after warm-up")
    weight_decay: float = setting(1.0e-4, "AdamW's weight decay")
    lr_scheduler: str = setting("cosine", "a transformers.get_scheduler name: cosine, linear, constant_with_warmup, ...")
    lr_warmup_steps: int = setting(200, "optimizer steps of linear warm-up")
    max_grad_norm: float = setting(1.0, "gradients are clipped to this norm")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = setting(
        None, "null: what `accelerate launch` was given (accelerate_config.yaml: bf16)")
    seed: int = setting(42, "the initial weights, the shuffling, the noise, the validation noise")
    init_from: str | None = setting(
        None, "a saved PokeSprite model (folder or Hub id) to start from instead of fresh weights: the model: block "
              "must build its architecture (the latent flow's flow stage starts from its autoencoder stage)")
    ema_decay: float = setting(0.995, "0 turns the exponential moving average off; the saved model holds the EMA weights")
    max_nonfinite_steps: int = setting(10, "stop after this many non-finite losses in a row")
    checkpointing_steps: int = setting(500, "save a checkpoint (and validate) every this many steps")
    checkpoints_total_limit: int | None = setting(3, "checkpoints kept (the best one besides); null keeps every one")
    validation_steps: int = setting(500, "validation loss and a sample grid every this many steps")
    logging_steps: int = setting(10, "log the training losses every this many steps")
    num_validation_prompts: int = setting(8, "fixed validation captions shown in the sample grid")
    compile: bool = setting(False, "torch.compile the model (GPU; first steps are slow)")
    channels_last: bool | None = setting(
        None, "channels-last memory format for the convolutions; --no-channels_last turns it off "
              "(null: on for CPU, off on GPUs)", nargs="?", const=True)

    def __post_init__(self):
        max_steps = self._integer("max_train_steps", 1, null="to train num_epochs epochs")
        if max_steps is None:
            self._integer("num_epochs", 1)
        for key in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                    "logging_steps", "max_nonfinite_steps", "num_validation_prompts"):
            self._integer(key, 1)
        self._integer("checkpoints_total_limit", 1, null="to keep every checkpoint")
        warmup = self._integer("lr_warmup_steps", 0)
        self._integer("seed", 0, 2**32 - 1)  # numpy's seeds end there
        self._text("init_from", null=True)
        lr = self._number("learning_rate", 0, low_open=True)
        weight_decay = self._number("weight_decay", 0)
        self._number("max_grad_norm", 0, low_open=True)
        self._number("ema_decay", 0, high=1)  # 0: no EMA; 1 would never move
        if self.mixed_precision is not None:
            self._text("mixed_precision", ["no", "fp16", "bf16"])
        self._boolean("compile")
        self._boolean("channels_last", null=True)
        name = self._text("lr_scheduler", [s.value for s in SchedulerType])
        import torch
        from transformers import get_scheduler

        try:  # some schedulers need arguments the trainer does not pass, or a metric at each step: build one and step it
            optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr, weight_decay=weight_decay)
            scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps or 1000)
            optimizer.step()
            scheduler.step()
        except Exception as e:
            raise PreflightError(f"{setting_name(self._section, 'lr_scheduler')} {name!r} does not work with this trainer ({error_summary(e)})")


@dataclass
class DataArguments(Checked):
    """The YAML's `data:` block."""

    _argument_group_name = "data (YAML data:)"
    _section = "data"

    dataset: str = setting("data/pokesprite", "prepare_dataset.py output folder or Hub dataset id")
    hflip: bool = setting(True, "augmentation: random horizontal flips (--no_hflip turns them off)")
    max_shift: int = setting(4, "augmentation: random shifts of up to this many pixels (0: none)")
    recolour: float = setting(0.0, "augmentation: the share of sprites recoloured, shiny-Pokémon style, to another of "
                              "red, yellow, green, blue, purple and pink, their caption's colour word swapped to match "
                              "(0: none). Needs the dataset's 'color' column and RGBA sprites")

    def __post_init__(self):
        self._text("dataset")
        self._boolean("hflip")
        self._integer("max_shift", 0)
        self._number("recolour", 0, high=1, high_open=False)

    def check_for(self, image_size):
        """A shift must leave part of a sprite of `image_size` in view."""
        if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0:
            self._integer("max_shift", 0, image_size - 1)


@dataclass
class OutputArguments(Checked):
    """The YAML's `output:` block."""

    _argument_group_name = "output (YAML output:)"
    _section = "output"

    output_dir: str = setting("outputs/pokesprite", "where checkpoints, logs, samples and the final model go")
    report_to: Literal[REPORT_TO] = setting("tensorboard", "where to log")
    experiment_name: str = setting("pokesprite", "tracker project and run name")
    push_to_hub: bool = setting(False, "upload the final model with HfApi")
    hub_model_id: str | None = setting(None, "defaults to <your user>/<output_dir name>")
    hub_private: bool = setting(False, "with --push_to_hub: create the Hub repo private",
                                aliases=["--hub_private_repo", "--hub-private-repo"])

    def __post_init__(self):
        self._text("output_dir")
        self._text("report_to", list(REPORT_TO))
        self._text("experiment_name")
        self._boolean("push_to_hub")
        self._text("hub_model_id", null=True)
        self._boolean("hub_private")


SECTIONS = {"training": TrainingArguments, "data": DataArguments, "output": OutputArguments}


# the model block: PokeSpriteConfig's own keywords, flags generated from them


def _model_fields():
    """PokeSpriteConfig's keywords (those it declares, not PretrainedConfig's), but text_config, which the
    pretrained BERT (`model_name`) gives."""
    own = PokeSpriteConfig.__annotations__
    return {f.name: f for f in dataclasses.fields(PokeSpriteConfig) if f.name in own and f.name != "text_config"}


MODEL_FIELDS = _model_fields()


def _config_docs():
    """{field: its entry in PokeSpriteConfig's docstring}: an entry starts at a line naming fields as `name (`type`,
    default)` and runs on over the lines indented deeper."""
    entries, current = [], None
    for line in (PokeSpriteConfig.__doc__ or "").splitlines():
        indent = len(line) - len(line.lstrip())
        if re.match(r"\s+\w+(, \w+)* \(`", line):
            current = [indent, line.strip()]
            entries.append(current)
        elif current is not None and line.strip() and indent >= current[0] and not line.rstrip().endswith(":"):
            current[1] += " " + line.strip()
        else:
            current = None
    docs = {}
    for _, text in entries:
        for name in re.findall(r"\b(\w+)(?=(?:, \w+)* \(`)", text):
            docs.setdefault(name, text)
    return docs


def _model_argument(f, docs=_config_docs()):
    kind = f.type
    choices = {"generator_type": GENERATOR_TYPES, "latent_flow_stage": LATENT_FLOW_STAGES}
    if f.name in choices:
        kind = Literal[choices[f.name]]
    elif isinstance(f.default, (list, tuple)):
        kind = list[int]
    help = docs.get(f.name, f"PokeSpriteConfig.{f.name}").replace("%", "%%")
    if f.name == "model_name":
        return kind, setting(f.default, "the pretrained BERT to start from: Hub id or local folder",
                             aliases=["--text_encoder", "--text-encoder"])
    if isinstance(f.default, (list, tuple)):
        return kind, field(default_factory=lambda d=f.default: list(d), metadata={"help": help})
    return kind, setting(f.default, help)


# flags only: the model's values are checked by PokeSpriteConfig itself
ModelArguments = dataclasses.make_dataclass(
    "ModelArguments", [(name, *_model_argument(f)) for name, f in MODEL_FIELDS.items()],
    namespace={"_argument_group_name": "model (YAML model:, PokeSpriteConfig's keywords)"})


# parsing


def make_parser():
    """HfArgumentParser over every section; no flag has a default here (the YAML and the dataclasses give them),
    so the namespace holds exactly the flags that were given. --help shows the defaults of the dataclasses."""
    parser = HfArgumentParser((RunArguments, ModelArguments, TrainingArguments, DataArguments, OutputArguments),
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # HfArgumentParser adds a --no_ flag only for a field whose default is True
    parser.add_argument("--no_channels_last", "--no-channels_last", "--no-channels-last", dest="channels_last",
                        action="store_false", help="see --channels_last")
    run = {f.name for f in dataclasses.fields(RunArguments)}
    for action in parser._actions:
        if action.dest in run or action.dest == "help":
            continue
        if action.help and not isinstance(action, argparse._StoreFalseAction):
            action.help = f"{action.help} (default: {str(action.default).replace('%', '%%')})"
        action.default = argparse.SUPPRESS
    return parser


def _default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def parse_args(argv=None):
    """The command line: every setting's value, the dataclasses' default where no flag was given (the YAML fills
    those in: load_config); `given_flags` names the settings that were given, the ones that override the YAML."""
    args = make_parser().parse_args(None if argv is None else [str(a) for a in argv])
    run = {f.name for f in dataclasses.fields(RunArguments)}
    args.given_flags = sorted(set(vars(args)) - run)
    for kind in (ModelArguments, *SECTIONS.values()):
        for f in dataclasses.fields(kind):
            if not hasattr(args, f.name):
                setattr(args, f.name, _default(f))
    return args


# the nested blocks of configs written before the model: block was PokeSpriteConfig's keywords
_FLAT = "the model: block is flat now, PokeSpriteConfig's keywords as config.json names them"
EARLIER_LAYOUT = {
    ("model", "text_encoder"): f"{_FLAT}: model_name, hidden_size, num_attention_heads, num_hidden_layers, "
                               "max_text_length, freeze_text_encoder",
    ("model", "decoder"): _FLAT, ("model", "diffusion"): _FLAT,
    ("training", "loss"): "the loss weights l1_weight, mse_weight and attention_weight are model: keys now",
}


def read_config(path):
    """The YAML as {block: {key: value}}; PreflightError for a missing or invalid file and for an unknown key."""
    path = Path(path)
    if not path.is_file():
        raise PreflightError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PreflightError(f"config file {path} is not valid YAML: {e}".splitlines()[0])
    cfg = {} if cfg is None else cfg
    known = {"model": MODEL_FIELDS, **{name: {f.name for f in dataclasses.fields(kind)} for name, kind in SECTIONS.items()}}

    def mapping(value, where):
        if not isinstance(value, dict):
            raise PreflightError(f"config file {path}: {where} should be a mapping of keys, not {type(value).__name__}")

    mapping(cfg, "the file")
    unknown = [(None, block) for block in cfg if block not in known]
    for block, values in cfg.items():
        if block in known:
            mapping(values, block)
            unknown += [(block, key) for key in values if key not in known[block]]
    if unknown:
        def named(block, key):
            if (block, key) in EARLIER_LAYOUT:
                return f"{block}.{key} ({EARLIER_LAYOUT[block, key]})"
            near = difflib.get_close_matches(str(key), list(known[block] if block else known), n=1)
            return f"{block + '.' if block else ''}{key}" + (f" (did you mean {near[0]}?)" if near else "")
        raise PreflightError(f"config file {path}: unknown key(s) " + ", ".join(named(b, k) for b, k in unknown))
    return cfg


@dataclass
class Settings:
    """Every setting of one run: the model's (a checked PokeSpriteConfig, and the keywords it was built from),
    training, data and output."""

    model: PokeSpriteConfig
    model_keywords: dict
    training: TrainingArguments
    data: DataArguments
    output: OutputArguments

    def lookup(self, name):
        """The value of a setting by its flag's name, whichever block it is in."""
        if name in MODEL_FIELDS:
            return getattr(self.model, name)
        for block in (self.training, self.data, self.output):
            if name in {f.name for f in dataclasses.fields(block)}:
                return getattr(block, name)
        raise KeyError(name)

    def hyperparameters(self):
        """Flat keys and scalar values, for the trackers (TensorBoard's hparams accept nothing else)."""
        values = {f"model.{k}": getattr(self.model, k) for k in MODEL_FIELDS}
        for name, block in (("training", self.training), ("data", self.data), ("output", self.output)):
            values.update({f"{name}.{k}": v for k, v in dataclasses.asdict(block).items()})
        return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def build_settings(cfg, path="the config"):
    """Settings from {block: {key: value}} (the YAML with the flags written over it): each block checked as it is
    built; PreflightError, one line, for the first bad value."""
    training = TrainingArguments(**cfg.get("training", {}))
    data = DataArguments(**cfg.get("data", {}))
    output = OutputArguments(**cfg.get("output", {}))
    model_keywords = dict(cfg.get("model", {}))
    name = model_keywords.get("model_name", MODEL_FIELDS["model_name"].default)
    if not isinstance(name, str) or not name.strip():
        raise PreflightError(f"--text_encoder (model.model_name) must be a non-empty string, got {shown(name)}")
    try:
        model = PokeSpriteConfig(**model_keywords)
    except Exception as e:  # ValueError from __post_init__, TypeError or a strict-type error for a wrong type
        lines = str(e).strip().splitlines()
        raise PreflightError(f"invalid model config in {path}: {lines[0] if lines else type(e).__name__}")
    data.check_for(model.image_size)
    return Settings(model=model, model_keywords=model_keywords, training=training, data=data, output=output)


def load_config(args):
    """The run's Settings: the YAML of args.config, each flag of args written over its key, checked."""
    cfg = read_config(args.config)
    # from parse_args: only the flags that were given override the YAML; a Namespace made by hand: all it holds
    given = {k: v for k, v in vars(args).items() if k in getattr(args, "given_flags", vars(args))}
    blocks = {"model": set(MODEL_FIELDS), **{name: {f.name for f in dataclasses.fields(kind)} for name, kind in SECTIONS.items()}}
    for block, keys in blocks.items():
        flags = {k: v for k, v in given.items() if k in keys}
        if flags:
            cfg[block] = {**cfg.get(block, {}), **flags}
    if getattr(args, "use_wandb", False):
        output = cfg.setdefault("output", {})
        output["report_to"] = "all" if output.get("report_to", OutputArguments.report_to) == "tensorboard" else "wandb"
    return build_settings(cfg, args.config)


def load_settings(path, **overrides):
    """The Settings of a YAML file, with `overrides` (any setting, by its flag's name) written over it, as the
    command line would: `load_settings("config/cpu.yaml", generator_type="decoder").training.learning_rate`."""
    known = set(MODEL_FIELDS).union(*({f.name for f in dataclasses.fields(kind)} for kind in SECTIONS.values()))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"not settings: {', '.join(unknown)}")
    return load_config(argparse.Namespace(config=str(path), use_wandb=False, **overrides))


def model_settings(path, **overrides):
    """The model block of a YAML as PokeSpriteConfig keywords (with `model_name`, the BERT to start from), checked:
    `PokeSpriteConfig(**model_settings("config/cpu.yaml"))`."""
    return load_settings(path, **overrides).model_keywords


def use_channels_last(device, requested=None):
    """--channels_last when given; otherwise on for CPU only.

    On CPU the decoder's step was faster in channels-last in five benchmark runs of six, by up to 1.35x
    (BENCHMARKS.md). Not the GPU default: unmeasured there, and GroupNorm's CUDA kernel has converted it to NCHW
    (pytorch#111824).
    """
    return device.type == "cpu" if requested is None else requested

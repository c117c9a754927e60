#!/usr/bin/env python
"""A training checkpoint as a model folder that `from_pretrained`, `generate.py` and `evaluate_model.py` load.

    python scripts/export_checkpoint.py outputs/cpu/checkpoint-1250 outputs/cpu-step1250

The architecture and tokenizer come from a saved model of the same config (default: the finished run's folder, the
checkpoint's parent; `--like` names another, e.g. a short run of the same YAML while the long one still trains),
the weights from the checkpoint: its EMA weights when the run kept an EMA (what the final model holds too), else
the trained ones.
"""
import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_pokesprite import PokeSpriteModel  # noqa: E402


def export(checkpoint, destination, like=None):
    checkpoint = Path(checkpoint)
    run = Path(like) if like else checkpoint.parent
    if not (run / "config.json").is_file():
        raise SystemExit(f"error: {run} has no config.json: pass --like a saved model of the same config")
    model = PokeSpriteModel.from_pretrained(run)
    ema = checkpoint / "ema.safetensors"
    if ema.is_file():  # torch.optim.swa_utils.AveragedModel: the model's keys under "module.", and a step counter
        weights = {k.removeprefix("module."): v for k, v in load_file(str(ema)).items() if k.startswith("module.")}
    else:
        weights = load_file(str(checkpoint / "model.safetensors"))
    model.load_state_dict(weights, strict=True)
    model.save_pretrained(destination)
    model.tokenizer.save_pretrained(destination)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint-N folder inside a finished run's output_dir")
    parser.add_argument("destination", help="where the model folder goes")
    parser.add_argument("--like", help="a saved model of the same config (default: the checkpoint's run folder)")
    args = parser.parse_args()
    export(args.checkpoint, args.destination, args.like)
    print(f"saved {args.destination}")

#!/usr/bin/env python
"""What the training loop's augmentation costs a step: `augment` (flips, shifts) alone and with `recolour`.

    python benchmarks/bench_augment.py --dataset data/pokesprite --out benchmarks/results/augment_cpu.json

The training split's sprites, as train_accelerate.py holds them (`split_to_tensors(..., recolour=True)`), a batch
of --batch_size drawn at random each repetition; the median over --repeats, after 5 untimed ones. Compare it with a
training step (about 0.5-0.7 s for config/cpu.yaml on 2 cores, benchmarks/bench_generators.py).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_pokesprite import augment, load_splits, recolour, split_to_tensors, write_json  # noqa: E402
from machine import machine  # noqa: E402


class Tokenizer:
    """Token ids play no part in the timing: one id per caption."""

    def __call__(self, texts, **kwargs):
        ones = torch.ones(len(texts), 1, dtype=torch.long)
        return {"input_ids": ones, "attention_mask": ones}


def median_ms(fn, repeats):
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/pokesprite")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    split = load_splits(args.dataset)["train"]
    train = split_to_tensors(split, Tokenizer(), SimpleNamespace(image_size=64, num_channels=4, max_text_length=48),
                             recolour=True)
    n = len(train["pixels"])
    batch = lambda: torch.randint(n, (args.batch_size,))
    flips_shifts = lambda: augment(train["pixels"][batch()], hflip=True, max_shift=2, background=0.0)[0]

    def with_recolour():
        idx = batch()
        return recolour(augment(train["pixels"][idx], hflip=True, max_shift=2, background=0.0)[0], idx, train, 0.5)

    results = {
        "machine": machine("cpu"),
        "batch_size": args.batch_size,
        "recolourable_sprites": int((train["colour"] >= 0).sum()),
        "sprites": n,
        "augment_ms": median_ms(flips_shifts, args.repeats),
        "augment_and_recolour_ms": median_ms(with_recolour, args.repeats),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()

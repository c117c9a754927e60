#!/usr/bin/env python
"""A markdown table of evaluate_model.py results, one row per eval.json, as RESULTS.md shows them.

    python scripts/results_table.py real=outputs/eval/real retrieval=outputs/eval/retrieval flow-15min=outputs/eval/flow-15
"""
import json
import sys
from pathlib import Path

COLUMNS = [  # (eval.json key, header, format)
    ("colour/accuracy", "colour accuracy", "{:.3f}"),
    ("diversity/diversity", "diversity", "{:.3f}"),
    ("diversity/feature_diversity", "feature diversity", "{:.1f}"),
    ("memorisation/nn_ratio", "nn_ratio", "{:.2f}"),
    ("memorisation/copy_fraction", "copies", "{:.3f}"),
    ("frechet/frechet_distance", "Fréchet", "{:.1f}"),
    ("frechet/kid", "KID", "{:.2f}"),
    ("reconstruction/l1", "L1", "{:.3f}"),
    ("reconstruction/ssim", "SSIM", "{:.3f}"),
    ("structure/roughness_ratio", "roughness ratio", "{:.2f}"),  # 1: as real sprites; above: speckle
    ("structure/complexity_ratio", "complexity ratio", "{:.2f}"),  # 1: as real sprites; below: blobs
    ("structure/concavity_ratio", "concavity ratio", "{:.2f}"),  # 1: as real sprites; below: blobs, whatever the outline
    ("structure/coverage_ratio", "coverage ratio", "{:.2f}"),  # 1: as real sprites; above: spread over more canvas
    ("structure/limb_ratio", "limb ratio", "{:.2f}"),  # 1: as real sprites; below: bodies without legs, tails or ears
    ("fit/nearest_is_own", "nearest is own (training)", "{:.2f}"),  # with --train_prompts: does it redraw its own?
    ("fit/l1", "L1 to own", "{:.3f}"),
    ("seconds_per_sprite", "s/sprite", "{:.3f}"),
]


def main(rows):
    print("| row | " + " | ".join(header for _, header, _ in COLUMNS) + " |")
    print("| --- " * (len(COLUMNS) + 1) + "|")
    for row in rows:
        name, folder = row.split("=", 1)
        metrics = json.loads((Path(folder) / "eval.json").read_text())
        cells = [fmt.format(metrics[key]) if key in metrics else "" for key, _, fmt in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env python
"""Score sample sheets (PNG grids of 64 x 64 sprites on white) with the metrics of evaluate_model.py: the reference
sheets in ../shared/reference, which come without a model, beside this project's own sheets at the same size.

    python scripts/score_sheet.py ../shared/reference/diffusion_unseen-descriptions.png \
        outputs/eval/cpu/validation-prompts.png --dataset data/pokesprite --out outputs/eval/sheets.json

A sheet's columns are prompts and its rows seeds, as both kinds of sheet are laid out. Its sprites are cut out on a
grid with no padding (the reference sheets) or torchvision's 2 px (evaluate_model.py's sheets), whichever the size
fits. The captions behind a sheet are not known, so only what needs none is scored (the limbs depend on what the
captions describe more than the rest: hold them against the real sprites of the same captions, RESULTS.md):

- against real validation sprites, as many as the sheet holds, drawn `--draws` times (fixed seed) and averaged:
  memorisation (each sprite's distance to its nearest training sprite next to theirs: nn_ratio, and the share of
  near-copies), Fréchet distance and KID, and the structure ratios (roughness, silhouette complexity, concavity,
  coverage and limbs: metrics/sprite_structure). A sheet holds a few dozen sprites and Fréchet distance depends on
  the count, so compare sheets of one size only;
- diversity between the rows (the seeds) of each column, where there are two rows or more;
- with `--own_captions`, for evaluate_model.py's `validation-prompts.png` (its columns are the first validation
  captions): the structure again, against those captions' own sprites (`own_structure/*`).
"""

import argparse
import sys
from pathlib import Path

import evaluate
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_pokesprite import load_splits, split_pixels, write_json  # noqa: E402
from evaluate_model import METRICS_DIR, prefixed  # noqa: E402

SIZE = 64


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sheets", nargs="+", help="sample sheets (PNG)")
    parser.add_argument("--dataset", default="data/pokesprite", help="prepare_dataset.py's output: its training and validation sprites")
    parser.add_argument("--draws", type=int, default=5, help="draws of real validation sprites to average Fréchet and KID over")
    parser.add_argument("--own_captions", action="store_true",
                        help="the sheets' columns are the first validation captions (evaluate_model.py's validation-prompts.png): "
                             "also score the structure against those captions' own sprites")
    parser.add_argument("--out", help="write the scores as JSON here, one entry per sheet")
    return parser.parse_args(argv)


def sheet_tiles(path):
    """(rows, columns, 3, 64, 64) floats in [0, 1]: the sprites of a sheet laid out with 0 or 2 px of padding."""
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    height, width = image.shape[:2]
    for pad in (0, 2):
        step = SIZE + pad
        if (width - pad) % step == 0 and (height - pad) % step == 0:
            rows, columns = (height - pad) // step, (width - pad) // step
            tiles = [[image[pad + r * step: pad + r * step + SIZE, pad + c * step: pad + c * step + SIZE] for c in range(columns)]
                     for r in range(rows)]
            return torch.from_numpy(np.array(tiles)).permute(0, 1, 4, 2, 3)
    raise SystemExit(f"error: {path} is {width} x {height} px, not a grid of {SIZE} px sprites with 0 or 2 px of padding")


def score(tiles, train, val, draws, own_captions=False):
    """The scores of the module docstring for one sheet's tiles against the training and validation sprites."""
    rows, columns = tiles.shape[:2]
    sprites = tiles.flatten(0, 1)
    n = len(sprites)
    if n > len(val):
        raise SystemExit(f"error: the sheet holds {n} sprites and the validation split {len(val)}: nothing to compare at equal size")
    load = lambda name: evaluate.load(str(METRICS_DIR / name))
    generator = torch.Generator().manual_seed(0)
    real = [val[torch.randperm(len(val), generator=generator)[:n]] for _ in range(draws)]
    scores = {"rows": rows, "columns": columns}
    memorisation, frechet, structure = load("memorisation"), load("frechet"), load("sprite_structure")
    for prefix, compute in (
        ("memorisation", lambda draw: memorisation.compute(predictions=sprites, references=draw, train_images=train)),
        # KID on the sheet's whole set: subsets of every sprite would be the same subset each time
        ("frechet", lambda draw: frechet.compute(predictions=sprites, references=draw, kid_subset_size=n, kid_subsets=1)),
        ("structure", lambda draw: structure.compute(predictions=sprites, references=draw)),
    ):
        runs = [prefixed(prefix, compute(draw)) for draw in real]
        scores.update({key: float(np.mean([run[key] for run in runs])) for key in runs[0]})
    if own_captions:  # each sprite against the real sprite of its column's caption, row after row as flatten lays them
        own = val[:columns].repeat(rows, 1, 1, 1)
        scores.update(prefixed("own_structure", structure.compute(predictions=sprites, references=own)))
    if rows > 1:
        group_ids = list(range(columns)) * rows
        scores.update(prefixed("diversity", load("diversity").compute(predictions=sprites, group_ids=group_ids)))
    return scores


def main(argv=None):
    args = parse_args(argv)
    splits = load_splits(args.dataset)
    # RGBA floats in [0, 1], fitted as the trainer fits them
    train, val = (split_pixels(splits[name], SIZE, 4).float() / 255 for name in ("train", "validation"))
    results = {}
    for path in args.sheets:
        results[path] = score(sheet_tiles(path), train, val, args.draws, args.own_captions)
        print(path, " ".join(f"{key} {value:.3f}" for key, value in results[path].items() if key not in ("rows", "columns")))
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()

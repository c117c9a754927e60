#!/usr/bin/env python
"""A learned judge of how a sprite's parts are arranged: context prediction (Doersch et al., 2015, "Unsupervised
Visual Representation Learning by Context Prediction") trained on the real training sprites, then asked of sample
sheets.

    python scripts/layout_judge.py ../shared/reference/*_unseen-descriptions.png outputs/eval/*/validation-all.png \
        --dataset data/pokesprite --judge outputs/layout-judge.safetensors --out outputs/eval/layout.json

The judge sees two small patches of a sprite, a centre one and one of its eight neighbours on a 3 x 3 grid (with a
gap and a jitter between them, so that the lines running across the border cannot give the answer away), and names
which neighbour the second one is. Both patches lie inside the creature, and each loses its local mean: the outline
(which metrics/sprite_structure judges) and the shading (light from the top left, which a smooth blob has too) would
otherwise give the answer away. What is left is the parts: eyes above a mouth, a belly below a face, ink lines where
a limb meets the body. A blob of mottled colour or a speckled body has none to go by.

Score, per set of sprites: `accuracy`, the share of pairs (`--pairs` a sprite on average) whose neighbour the judge
names (chance is 1/8), and `accuracy_ratio`, that over the real validation sprites' own, with two spreads (5th to
95th percentile): `ratio_interval`, the set's own bootstrap interval (its captions drawn again with replacement),
which says whether two sets can be told apart, and for sets smaller than the validation split `real_ratio_spread`, what
random sets of as many real validation sprites score. A sheet of 64 sprites is too few to rank models; the
`validation-all.png` of evaluate_model.py (167 captions x 4 seeds) holds every sprite it scored. The judge is trained on the
training split, so it is a yardstick of this dataset's sprites, not of sprites in general; RESULTS.md has what it
separates ("A learned judge of the inside").

A judge's training run matters: three seeds have rated one model's 668 sprites 0.73, 0.85 and 0.87, more apart than
two designs were. `--seeds 0 1 2` asks a panel, one judge per seed (`--judge` then names each file with `{seed}`),
and scores each set by the panel's mean ratio (each judge's under `judges`), its bootstrap interval averaged draw by
draw over the same captions:

    python scripts/layout_judge.py SHEETS --seeds 0 1 2 --judge outputs/layout-judge-seed{seed}.safetensors
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "metrics" / "sprite_structure")]
from attention_maps import on_white  # noqa: E402
from data_pokesprite import load_splits, split_pixels, write_json  # noqa: E402
from score_sheet import sheet_tiles  # noqa: E402
from sprite_structure import FOREGROUND_BELOW  # noqa: E402  (a pixel is the creature's when a channel is darker)

PATCH = 12  # px: big enough for an eye or a foot, small enough that a 3 x 3 grid of them fits inside a creature
GAP = 3  # px between neighbouring patches, before the jitter
JITTER = 1  # px each patch may move on its own
STRIDE = PATCH + GAP
MIN_CREATURE = 0.95  # both patches of a pair must be this much creature: the inside, where the parts are, not the outline
# the eight neighbours of the centre cell, in reading order: (row, column) steps on the grid
NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sheets", nargs="*", help="sample sheets (PNG) to judge")
    parser.add_argument("--dataset", default="data/pokesprite", help="prepare_dataset.py's output: the judge trains on its training split")
    parser.add_argument("--steps", type=int, default=3000, help="training steps of the judge")
    parser.add_argument("--batch_size", type=int, default=128, help="pairs a step")
    parser.add_argument("--pairs", type=int, default=64, help="pairs asked of each judged sprite")
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                        help="one judge per seed, a panel: a judge's training run moves a set's ratio by more than its bootstrap "
                             "interval, so rank by the panel's mean (RESULTS.md)")
    parser.add_argument("--judge", help="a trained judge (safetensors): loaded if the file exists, else trained and saved there; "
                                        "with several --seeds, a path with {seed} in it")
    parser.add_argument("--out", help="write the scores as JSON here")
    return parser.parse_args(argv)


class PairJudge(nn.Module):
    """One small conv encoder for both patches (shared weights), and a classifier of the pair's relative position."""

    def __init__(self, width=32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),  # 6 px
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),  # 3 px
            nn.Flatten(),
        )
        features = 2 * width * 3 * 3
        self.head = nn.Sequential(nn.Linear(2 * features, 256), nn.ReLU(), nn.Linear(256, len(NEIGHBOURS)))

    def forward(self, centre, neighbour):
        return self.head(torch.cat([self.encoder(high_pass(centre)), self.encoder(high_pass(neighbour))], dim=1))


def high_pass(patches):
    """Each patch less its 5 x 5 local mean: edges, lines and eyes stay, shading goes. Light from the top left tells a
    patch's place on a smooth blob as well as on a creature: with it, and with pairs that may cross the outline, the
    judge rated the GAN's shaded blobs above real sprites (RESULTS.md, "A learned judge of the inside")."""
    return patches - F.avg_pool2d(patches, 5, stride=1, padding=2, count_include_pad=False)


def sample_pairs(rgb, creature, n, generator):
    """n (centre, neighbour, label, sprite) patch pairs from random sprites of (B, 3, 64, 64) RGB on white whose two patches
    are at least MIN_CREATURE creature; fewer if the sprites do not hold that many (blank or tiny ones)."""
    size = rgb.shape[-1]
    span = 3 * PATCH + 2 * GAP + 2 * JITTER
    centres, neighbours, labels, sprites = [], [], [], []
    for _ in range(8):  # most draws land on the creature; a few rounds fill the batch
        sprite = torch.randint(len(rgb), (4 * n,), generator=generator)
        label = torch.randint(len(NEIGHBOURS), (4 * n,), generator=generator)
        origin = torch.randint(size - span + 1, (4 * n, 2), generator=generator) + JITTER
        steps = torch.tensor(NEIGHBOURS)[label] + 1
        centre_at = origin + STRIDE + torch.randint(-JITTER, JITTER + 1, (4 * n, 2), generator=generator)
        neighbour_at = origin + steps * STRIDE + torch.randint(-JITTER, JITTER + 1, (4 * n, 2), generator=generator)
        inside = lambda at: cut_patches(creature, sprite, at).mean((1, 2, 3)) >= MIN_CREATURE
        keep = inside(centre_at) & inside(neighbour_at)
        sprite, label = sprite[keep], label[keep]  # cut the colour patches of the kept pairs only
        centres.append(cut_patches(rgb, sprite, centre_at[keep]))
        neighbours.append(cut_patches(rgb, sprite, neighbour_at[keep]))
        labels.append(label)
        sprites.append(sprite)
        if sum(len(x) for x in labels) >= n:
            break
    return tuple(torch.cat(x)[:n] for x in (centres, neighbours, labels, sprites))


def cut_patches(images, sprite, at):
    """(n, C, PATCH, PATCH): the patch of images[sprite[i]] whose top-left corner is at[i] (row, column)."""
    offsets = torch.arange(PATCH)
    rows = (at[:, 0, None] + offsets)[:, :, None]
    columns = (at[:, 1, None] + offsets)[:, None, :]
    return images[sprite[:, None, None], :, rows, columns].permute(0, 3, 1, 2)


def creature_of(rgb):
    return (rgb.amin(1, keepdim=True) < FOREGROUND_BELOW).float()


def train_judge(rgb, steps, batch_size, seed):
    """The judge, trained on the pairs of (N, 3, 64, 64) real sprites on white; fresh pairs every step."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    creature = creature_of(rgb)
    judge = PairJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for step in range(steps):
        centre, neighbour, label, _ = sample_pairs(rgb, creature, batch_size, generator)
        loss = F.cross_entropy(judge(2 * centre - 1, 2 * neighbour - 1), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"judge step {step}: loss {loss.item():.3f}", flush=True)
    return judge


@torch.no_grad()
def judge_sprites(judge, tiles, pairs, seed):
    """Per caption of (rows, captions, 3, 64, 64) sprites on white (a sheet's seeds down, its captions across):
    (pairs asked, pairs the judge got right) over its seeds, `pairs` pairs a sprite on average (the pairs go to random
    sprites, and a sprite with a small inside gets fewer). Summed per caption, because a caption's seeds are not
    independent sprites: the bootstrap of `accuracy_draws` draws captions."""
    rgb = tiles.flatten(0, 1)
    generator = torch.Generator().manual_seed(seed)
    centre, neighbour, label, sprite = sample_pairs(rgb, creature_of(rgb), pairs * len(rgb), generator)
    right = torch.cat([judge(2 * c - 1, 2 * n - 1).argmax(1) for c, n in zip(centre.split(4096), neighbour.split(4096))]) == label
    per_caption = lambda values: torch.zeros(len(rgb)).index_add_(0, sprite, values).view(tiles.shape[:2]).sum(0)
    return per_caption(torch.ones(len(sprite))), per_caption(right.float())


def accuracy_draws(asked, right, n, replacement=False, draws=200, seed=0):
    """The pooled accuracy of `draws` random sets of n of these sprites: without replacement, what other sets of that
    size score; with it (n = all of them), the bootstrap of this set's own accuracy (pass per-caption sums to draw
    captions), which says whether two sets of sprites can be told apart. The draws depend only on (len(asked), n, seed),
    so every judge of a panel sees the same ones and their ratios can be averaged draw by draw."""
    generator = torch.Generator().manual_seed(seed)
    if replacement:
        picks = torch.randint(len(asked), (draws, n), generator=generator)
    else:
        picks = torch.stack([torch.randperm(len(asked), generator=generator)[:n] for _ in range(draws)])
    return right[picks].sum(1) / asked[picks].sum(1)


def percentiles(draws):
    """5th and 95th percentile."""
    return torch.quantile(draws, torch.tensor([0.05, 0.95])).tolist()


def load_or_train(path, train, args, seed):
    if path and Path(path).exists():
        judge = PairJudge()
        judge.load_state_dict(load_file(path))
    else:
        judge = train_judge(train, args.steps, args.batch_size, seed)
        if path:
            save_file(judge.state_dict(), path)
    return judge.eval()


def main(argv=None):
    args = parse_args(argv)
    if len(args.seeds) > 1 and args.judge and "{seed}" not in args.judge:
        raise SystemExit(f"error: --judge {args.judge} names one file for {len(args.seeds)} judges: put {{seed}} in it")
    splits = load_splits(args.dataset)
    train, val = (on_white(split_pixels(splits[name], 64, 4).float() / 255) for name in ("train", "validation"))
    sets = {"real validation sprites": val[None], "real training sprites (seen by the judge)": train[None]}
    sets.update((path, sheet_tiles(path)) for path in args.sheets)
    panel = {}  # seed: {set: (pairs asked, pairs right) per caption}
    for seed in args.seeds:
        judge = load_or_train(args.judge and args.judge.format(seed=seed), train, args, seed)
        panel[seed] = {name: judge_sprites(judge, tiles, args.pairs, seed + 1) for name, tiles in sets.items()}
    # each judge's accuracy on the real validation sprites (one caption a sprite): every ratio of that judge is to it
    real = {seed: judged["real validation sprites"] for seed, judged in panel.items()}
    real_accuracy = {seed: (right.sum() / asked.sum()).item() for seed, (asked, right) in real.items()}
    results = {}
    for name, tiles in sets.items():
        if any(judged[name][0].sum() == 0 for judged in panel.values()):
            raise SystemExit(f"error: {name}: no sprite has two {PATCH} px patches {GAP} px apart that are both "
                             f"{MIN_CREATURE:.0%} creature: nothing to judge")
        sprites = tiles.shape[0] * tiles.shape[1]
        accuracy, ratios, bootstrap, real_sets = [], {}, [], []
        for seed, judged in panel.items():
            asked, right = judged[name]
            accuracy.append((right.sum() / asked.sum()).item())
            ratios[str(seed)] = accuracy[-1] / real_accuracy[seed]
            # each ratio against the same real accuracy: two sets whose intervals part are told apart
            bootstrap.append(accuracy_draws(asked, right, len(asked), replacement=True) / real_accuracy[seed])
            if sprites < len(val):  # what sets of as many real sprites score: the noise a sheet's ratio has to clear
                real_sets.append(accuracy_draws(*real[seed], sprites) / real_accuracy[seed])
        results[name] = {"sprites": sprites, "pairs": sum(int(judged[name][0].sum()) for judged in panel.values()),
                         "accuracy": sum(accuracy) / len(accuracy), "accuracy_ratio": sum(ratios.values()) / len(ratios),
                         "ratio_interval": percentiles(torch.stack(bootstrap).mean(0)), "judges": ratios}
        if real_sets:
            results[name]["real_ratio_spread"] = percentiles(torch.stack(real_sets).mean(0))
    for name, scores in results.items():
        spread = scores.get("real_ratio_spread")
        spread = f", real sets of {scores['sprites']}: {spread[0]:.2f}-{spread[1]:.2f}" if spread else ""
        judges = f"; judges {' '.join(f'{r:.2f}' for r in scores['judges'].values())}" if len(panel) > 1 else ""
        low, high = scores["ratio_interval"]
        print(f"{name}: accuracy {scores['accuracy']:.3f}, {scores['accuracy_ratio']:.2f} of real (bootstrap {low:.2f}-{high:.2f}; "
              f"{scores['sprites']} sprites, {scores['pairs']} pairs{spread}{judges})")
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()

"""Time prepare_dataset.py on the real data (../shared/pokemon) and on synthetic creatures.

    python benchmarks/bench_prepare.py [--data ../shared/pokemon] [--repeat 3] [--budget 10]

Prints one row per stage (best and median of --repeat runs) and exits 1 when a full
preparation of the real data takes longer than --budget seconds.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

t0 = time.perf_counter()
import datasets  # noqa: E402

import prepare_dataset  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - t0


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("POKESPRITE_DATA", REPO_ROOT.parent / "shared" / "pokemon"),
                        type=Path, help="folder with pokemon.csv and small_images/")
    parser.add_argument("--repeat", type=int, default=3, help="runs per stage")
    parser.add_argument("--budget", type=float, default=10.0, help="fail if a full preparation takes longer (s)")
    parser.add_argument("--synthetic", type=int, default=512, help="rows for the synthetic stage")
    args = parser.parse_args()
    if not (args.data / "pokemon.csv").is_file():
        sys.exit(f"no data at {args.data} (pokemon.csv + small_images/); pass --data or set POKESPRITE_DATA")
    datasets.disable_progress_bars()
    csv_path, images = args.data / "pokemon.csv", args.data / "small_images"
    rows = len(prepare_dataset.load_rows(csv_path)[1])
    built, _ = prepare_dataset.build_dataset(csv_path, images)

    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**6))
        stages = [
            ("load_rows (CSV only)", rows, lambda: prepare_dataset.load_rows(csv_path)),
            ("build_dataset (decode, convert, captions)", rows, lambda: prepare_dataset.build_dataset(csv_path, images)),
            ("save_dataset (save_to_disk + rename)", rows,
             lambda: prepare_dataset.save_dataset(built, Path(tmp) / f"save{next(counter)}")),
            ("prepare: full run, real data", rows, lambda: prepare_dataset.prepare(csv_path, images, Path(tmp) / f"full{next(counter)}")),
            (f"build_synthetic_dataset({args.synthetic})", args.synthetic,
             lambda: prepare_dataset.build_synthetic_dataset(args.synthetic, seed=0)),
            ("dataset_stats (whitespace words)", rows, lambda: prepare_dataset.dataset_stats(built)),
        ]
        results = [(name, n, *timed(fn, args.repeat)) for name, n, fn in stages]

    print(f"import datasets + prepare_dataset: {IMPORT_SECONDS:.2f} s (once per process)")
    print(f"{'stage':<45} {'rows':>6} {'best s':>8} {'median s':>9} {'rows/s':>8}")
    for name, n, best, median in results:
        print(f"{name:<45} {n:>6} {best:>8.2f} {median:>9.2f} {n / best:>8.0f}")
    full = next(median for name, _, _, median in results if name.startswith("prepare"))
    total = full + IMPORT_SECONDS
    verdict = "OK" if total < args.budget else "TOO SLOW"
    print(f"full preparation incl. imports: {total:.2f} s (budget {args.budget:g} s): {verdict}")
    return 0 if total < args.budget else 1


if __name__ == "__main__":
    sys.exit(main())

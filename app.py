#!/usr/bin/env python
"""PokeSprite web demo: type a description, get sprites, and see where the model looked for each word.

    python app.py --model outputs/pokesprite               # a trained model folder
    POKESPRITE_MODEL=<user>/pokesprite python app.py       # or a Hub id, as a Hugging Face Space runs it

It follows the Spaces convention (this file at the top level, `demo.launch()` under `__main__`);
`scripts/make_space.py` writes a ready Space folder, whose `space_config.json` names the model. The page loads no
fonts or scripts from outside the server, and Gradio's telemetry is off.

One request cannot starve or kill the demo: a description is at most MAX_PROMPT_CHARS characters and a request
at most MAX_SPRITES sprites (checked in the handler too, since an API client skips the page), requests are sampled
`--concurrency` at a time and at most `--queue-size` wait; a waiting user sees their place in the queue.
"""

import json
import math
import os
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no telemetry, no version check

import argparse  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from attention_maps import attention_figure, attention_for_prompt  # noqa: E402
from generate import (  # noqa: E402
    MAX_SEED, GenerateError, check_prompt, check_seed, load_model, positive_int, progress_option, uses_guidance)

ALL_WORDS = -1  # the word dropdown's value for "every word's heatmap"
CSS = "#sprites img, #attention img { image-rendering: pixelated; }"  # sprites are pixel art: no smoothing
MAX_PROMPT_CHARS = 1000  # the model reads max_text_length tokens (48 by default, ~250 characters) anyway
MAX_SPRITES = 16  # per request
QUEUE_SIZE = 16  # requests that may wait; the next one is told the queue is full
CONCURRENCY = 1  # requests sampled at once
GUIDANCE_RANGE = (1.0, 10.0)
SPACE_CONFIG = Path(__file__).with_name("space_config.json")  # written by scripts/make_space.py


def space_defaults():
    """{"model": ..., "revision": ...} from space_config.json next to this file, or {} when there is none."""
    try:
        return json.loads(SPACE_CONFIG.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    space = space_defaults()
    parser.add_argument("--model", default=os.environ.get("POKESPRITE_MODEL") or space.get("model"),
                        help="a trained model folder or Hub id (default: $POKESPRITE_MODEL, else space_config.json's)")
    parser.add_argument("--revision", default=os.environ.get("POKESPRITE_REVISION") or space.get("revision"),
                        help="Hub branch, tag or commit to load (default: $POKESPRITE_REVISION, else space_config.json's)")
    parser.add_argument("--queue-size", type=positive_int, default=QUEUE_SIZE,
                        help="requests that may wait for their turn; more are refused (default: %(default)s)")
    parser.add_argument("--concurrency", type=positive_int, default=CONCURRENCY,
                        help="requests sampled at the same time (default: %(default)s)")
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument("--host", help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT or the first free one from 7860)")
    return parser.parse_args(argv)


def sentence(message):
    """generate.py's message (an error or a warning) as a sentence on the page: capitalised, with a full stop."""
    message = str(message)
    return f"{message[:1].upper()}{message[1:]}."


def check_request(prompt, num, seed, guidance_scale, guided):
    """(prompt, num, seed, guidance_scale) checked and converted, or a gr.Error saying what is wrong.

    Everything is checked here, not only in the page: an API client (gradio_client, curl) sends any value.
    """
    prompt = prompt or ""
    if not isinstance(prompt, str):
        raise gr.Error("The description must be text.")
    if len(prompt) > MAX_PROMPT_CHARS:  # before any work on it: a 20 MB prompt is refused at once
        raise gr.Error(f"The description is {len(prompt):,} characters long; the demo takes at most {MAX_PROMPT_CHARS:,}.")
    prompt = prompt.strip()
    if not prompt:
        raise gr.Error("Type a description of the sprite first.")
    if (isinstance(num, bool) or not isinstance(num, (int, float)) or not math.isfinite(num) or num != int(num)
            or not 1 <= num <= MAX_SPRITES):
        raise gr.Error(f"The number of sprites must be a whole number from 1 to {MAX_SPRITES}, got {num!r}.")
    try:
        seed = check_seed(0 if seed is None else seed)
    except GenerateError as e:
        raise gr.Error(sentence(e))
    if guided:
        low, high = GUIDANCE_RANGE
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or not low <= guidance_scale <= high:
            raise gr.Error(f"The guidance scale must be a number from {low} to {high}, got {guidance_scale!r}.")
        guidance_scale = float(guidance_scale)
    return prompt, int(num), seed, guidance_scale


def build_demo(model, queue_size=QUEUE_SIZE, concurrency=CONCURRENCY):
    """The Gradio Blocks for `model` (a loaded PokeSpriteModel with its tokenizer attached), its queue set up:
    `concurrency` requests sampled at once, at most `queue_size` waiting."""
    config = model.config
    guided = uses_guidance(model)  # guidance scale and sampling steps apply
    with_progress = progress_option(model.generate, True)  # a tqdm bar over the steps, which gr.Progress follows
    attention_progress = progress_option(model.forward, True)

    def make_sprites(prompt, num, seed, guidance_scale, progress=gr.Progress(track_tqdm=True)):
        prompt, num, seed, guidance_scale = check_request(prompt, num, seed, guidance_scale, guided)
        try:
            warning = check_prompt(model.tokenizer, prompt, "the description", config.max_text_length)
        except GenerateError as e:
            raise gr.Error(sentence(e))
        if warning:
            gr.Warning(sentence(warning))
        sampling = {"guidance_scale": guidance_scale} if guided else {}  # the same for the attention sprite
        progress(0, desc=f"Sampling {num} sprite{'s' if num > 1 else ''}")
        sprites = model.generate([prompt], num_images_per_prompt=num, generator=torch.Generator().manual_seed(seed),
                                 output_type="pil", **sampling, **with_progress)
        progress(0, desc="Attention maps")
        attention = attention_for_prompt(model, prompt, seed=seed, **sampling, **attention_progress)
        words = attention[2]
        choices = [("all words", ALL_WORDS)] + [(word, i) for i, word in enumerate(words)]
        return (sprites, attention, gr.Dropdown(choices=choices, value=ALL_WORDS, interactive=True),
                attention_figure(*attention))

    def show_word(index, attention):
        if attention is None or index is None:
            return None
        sprite, heatmaps, words = attention
        if index == ALL_WORDS:
            return attention_figure(sprite, heatmaps, words)
        return attention_figure(sprite, heatmaps[index : index + 1], words[index : index + 1], scale=4)

    with gr.Blocks(title="PokeSprite") as demo:
        gr.Markdown(f"# PokeSprite\nA description goes in, {config.image_size}x{config.image_size} sprites come out "
                    f"({config.generator_type} generator).")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Description", placeholder="a small blue water turtle", elem_id="prompt",
                                    max_length=MAX_PROMPT_CHARS)
                num = gr.Slider(1, MAX_SPRITES, value=4, step=1, label="Number of sprites", elem_id="num")
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed")
                guidance = gr.Slider(*GUIDANCE_RANGE, value=config.guidance_scale, step=0.5, label="Guidance scale",
                                     visible=guided, elem_id="guidance")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Sprites", format="png", columns=4, object_fit="contain", elem_id="sprites")
        word = gr.Dropdown(label="Word", choices=[], info="where the model looked for each token of the description",
                           elem_id="word")
        heatmap = gr.Image(label="Attention", format="png", type="pil", interactive=False, elem_id="attention")
        attention = gr.State()

        # one event for the button and the Enter key; "full" progress shows the place in the queue, then the steps
        gr.on([button.click, prompt.submit], make_sprites, [prompt, num, seed, guidance], [gallery, attention, word, heatmap],
              show_progress="full")
        word.change(show_word, [word, attention], heatmap)
    return demo.queue(max_size=queue_size, default_concurrency_limit=concurrency)


if __name__ == "__main__":
    args = parse_args()
    if not args.model:
        raise SystemExit("error: no model: pass --model FOLDER_OR_HUB_ID or set POKESPRITE_MODEL")
    try:
        model = load_model(args.model, args.revision, args.device)
    except GenerateError as e:
        raise SystemExit(f"error: {e}")
    demo = build_demo(model, queue_size=args.queue_size, concurrency=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, css=CSS)

#!/usr/bin/env python
"""PokeSprite web demo: type a description, get sprites, and see where the model looked for each word.

    python app.py --model outputs/pokesprite               # a trained model folder
    POKESPRITE_MODEL=<user>/pokesprite python app.py       # or a Hub id, as a Hugging Face Space runs it

It follows the Spaces convention (this file at the top level, `demo.launch()` under `__main__`): in a Space, set
the POKESPRITE_MODEL variable to the model's Hub id. The page loads no fonts or scripts from outside the server,
and Gradio's telemetry is off.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no telemetry, no version check

import argparse  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from attention_maps import attention_figure, attention_for_prompt  # noqa: E402
from generate import GenerateError, count_tokens, load_model  # noqa: E402

ALL_WORDS = -1  # the word dropdown's value for "every word's heatmap"
CSS = "#sprites img, #attention img { image-rendering: pixelated; }"  # sprites are pixel art: no smoothing


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("POKESPRITE_MODEL"),
                        help="a trained model folder or Hub id (default: $POKESPRITE_MODEL)")
    parser.add_argument("--revision", default=os.environ.get("POKESPRITE_REVISION"),
                        help="Hub branch, tag or commit to load (default: $POKESPRITE_REVISION)")
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument("--host", help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT or the first free one from 7860)")
    return parser.parse_args(argv)


def build_demo(model):
    """The Gradio Blocks for `model` (a loaded PokeSpriteModel with its tokenizer attached)."""
    config, tokenizer = model.config, model.tokenizer
    diffusion = config.generator_type == "diffusion"

    def make_sprites(prompt, num, seed, guidance_scale):
        prompt = (prompt or "").strip()
        if not prompt:
            raise gr.Error("Type a description of the sprite first.")
        n_tokens, dropped = count_tokens(tokenizer, prompt, config.max_text_length)
        if n_tokens == tokenizer.num_special_tokens_to_add():
            raise gr.Error("The description has no characters the tokenizer reads.")
        if dropped:
            gr.Warning(f"The description is {n_tokens} tokens long; the model reads the first {config.max_text_length}, "
                       f"so it ignores: {dropped!r}")
        seed = int(seed or 0)
        sampling = {"guidance_scale": float(guidance_scale)} if diffusion else {}  # the same for the attention sprite
        sprites = model.generate([prompt], num_images_per_prompt=int(num), generator=torch.Generator().manual_seed(seed),
                                 output_type="pil", **sampling)
        attention = attention_for_prompt(model, prompt, seed=seed, tokenizer=tokenizer, **sampling)
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
                prompt = gr.Textbox(label="Description", placeholder="a small blue water turtle", elem_id="prompt")
                num = gr.Slider(1, 16, value=4, step=1, label="Number of sprites", elem_id="num")
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                guidance = gr.Slider(1.0, 10.0, value=config.guidance_scale, step=0.5, label="Guidance scale",
                                     visible=diffusion, elem_id="guidance")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Sprites", format="png", columns=4, object_fit="contain", elem_id="sprites")
        word = gr.Dropdown(label="Word", choices=[], info="where the model looked for each token of the description",
                           elem_id="word")
        heatmap = gr.Image(label="Attention", format="png", type="pil", interactive=False, elem_id="attention")
        attention = gr.State()

        # one event for the button and the Enter key
        gr.on([button.click, prompt.submit], make_sprites, [prompt, num, seed, guidance], [gallery, attention, word, heatmap])
        word.change(show_word, [word, attention], heatmap)
    return demo


if __name__ == "__main__":
    args = parse_args()
    if not args.model:
        raise SystemExit("error: no model: pass --model FOLDER_OR_HUB_ID or set POKESPRITE_MODEL")
    try:
        model = load_model(args.model, args.revision, args.device)
    except GenerateError as e:
        raise SystemExit(f"error: {e}")
    demo = build_demo(model)
    demo.launch(server_name=args.host, server_port=args.port, css=CSS)

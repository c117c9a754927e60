"""PokeSprite configuration: every knob of the model in one place, saved as `config.json`."""

import math

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

# prajjwal1/bert-mini's architecture. A fresh `PokeSpriteConfig()` builds this encoder (randomly initialised) with
# no download; `PokeSpriteModel.from_text_encoder` swaps in any pretrained BERT's config and weights instead.
BERT_MINI = {
    "vocab_size": 30522,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": 512,
}


# modeling_pokesprite.GENERATORS maps each to its class
GENERATOR_TYPES = ("decoder", "diffusion", "flow", "latent-flow")
LATENT_FLOW_STAGES = ("joint", "autoencoder", "flow")
# the integer fields and their least usable value, and the float fields' ranges: checked when a config is built
INT_MINIMUMS = {
    "hidden_size": 1, "num_attention_heads": 1, "num_hidden_layers": 1, "max_text_length": 1, "image_size": 8, "num_channels": 3,
    "noise_dim": 1, "text_embedding_dim": 1, "base_channels": 1, "unet_patch_size": 1, "unet_layers_per_block": 1,
    "unet_pixel_head_channels": 0,
    "latent_channels": 1, "num_train_timesteps": 2, "num_inference_steps": 1,
}
FLOAT_RANGES = {
    "l1_weight": (0, math.inf), "mse_weight": (0, math.inf), "attention_weight": (0, math.inf),
    "text_dropout": (0, 1), "guidance_scale": (0, math.inf), "eta": (0, 1), "flow_shift": (0.1, 20), "epsilon_scaling": (0.5, 2), "flow_logit_mean": (-3, 3),
    "flow_min_snr_gamma": (0, math.inf), "input_perturbation": (0, 1),
    "initializer_range": (0, math.inf),
}


class PokeSpriteConfig(PretrainedConfig):
    r"""
    Configuration of a [`PokeSpriteModel`].

    Text encoder (shared by all generator types):
        text_config (`dict` or `BertConfig`): architecture of the BERT text encoder; bert-mini's by default.
        model_name (`str`): the pretrained BERT the model was created from (provenance; never downloaded on load).
        hidden_size (`int`, 256): width of the token transformer and of the keys/values of every cross-attention.
        num_attention_heads (`int`, 8), num_hidden_layers (`int`, 6): the transformer over BERT's tokens (heads
            also of every cross-attention).
        These three are the token transformer's, on top of BERT; `text_config` has BERT's own. Configs saved before
        they took transformers' names (`hidden_dim`, `nhead`, `num_encoder_layers`) load through `attribute_map`.
        max_text_length (`int`, 48): captions are padded/truncated to this many tokens.
        freeze_text_encoder (`bool`, True): keep BERT fixed and train only what sits on top of it.

    Output:
        image_size (`int`, 64), num_channels (`int`, 4): 4 is RGBA (transparent background), 3 is RGB.

    generator_type (`str`): "decoder" (the original design: one forward pass from noise plus text, trained with
        L1 + MSE), "diffusion" (a text-conditioned UNet trained with v-prediction and sampled with DDIM) or "flow"
        (the same UNet family trained as a rectified flow and sampled with Euler steps; with `unet_patch_size` 4
        it trains in an hour on a CPU: `config/cpu.yaml`) or "latent-flow" (the flow UNet on the latents of a small
        autoencoder trained with it or before it, see `latent_flow_stage`, instead of on folded pixels).

    Latent-flow generator (the UNet fields below apply to its UNet, which runs on the latents):
        latent_channels (`int`, 8): channels of the latent, at image_size / unet_patch_size px.
        autoencoder_channels (`list[int]`, [16, 64, 128]): the autoencoder's channels at image_size px and at each
            halving down to the latent's size, so log2(unet_patch_size) + 1 entries; the decoder mirrors them.
        latent_flow_stage (`str`, "joint"): what training trains. "joint": the flow and the autoencoder together, one
            loss. "autoencoder": the autoencoder alone (its reconstruction loss; nothing else learns). "flow": the
            flow alone, on the latents of a frozen autoencoder, so its target stays fixed from its first step
            (Rombach et al., 2022); start it from an "autoencoder" run's model with `--init_from` (RESULTS.md).

    Decoder generator:
        noise_dim (`int`, 100), text_embedding_dim (`int`, 256), base_channels (`int`, 512): a 4x4 map of
        `base_channels` is upsampled to `image_size`, halving the channels at each step.
        cross_attention_resolutions (`list[int]`, [8, 16, 32]): feature-map sizes that cross-attend to the tokens.
        l1_weight, mse_weight (`float`, 1.0): reconstruction terms.
        attention_weight (`float`, 0.01): the attention coverage term (see `PokeSpriteDecoder.attention_loss`).

    Diffusion, flow and latent-flow generators (the UNet):
        unet_patch_size (`int`, 1): the sprite is folded into patches of this size first (pixel-unshuffle), so the
            UNet runs at image_size / unet_patch_size px and below; latent-flow: how much smaller the latent is.
        unet_channels (`list[int]`, [64, 128, 256, 256]): channels at each UNet resolution, from the highest
            (64/32/16/8 px with patch size 1).
        unet_layers_per_block (`int`, 1): residual blocks per resolution.
        unet_symmetric (`bool`, False): the up path mirrors the down path block for block, each taking the skip of
            its twin (Ronneberger et al., 2015). False is diffusers' layout: one up block more per resolution, which
            also takes the outputs of the input convolution and of each downsampler; on 4x4 patches that extra
            block at 16 and 8 px is a quarter of the FLOPs (RESULTS.md).
        unet_attention_resolutions (`list[int]`, [16, 8]): resolutions with self- and cross-attention.
        unet_pixel_head_channels (`int`, 0): diffusion and flow with `unet_patch_size` > 1: a head of this many channels at full
            resolution after the patches are unfolded: two 3x3 convolutions (FiLM by the noise level and pooled text
            between them) read the UNet's output beside the noisy input and add a correction to it. Every other
            layer sees only 4x4 patches, so without it the estimate of even a nearly clean sprite comes out blurred
            and grainy (RESULTS.md); 0: no head.
        num_train_timesteps (`int`, 1000): diffusion: discrete steps of the cosine noise schedule; flow: the scale
            t in (0, 1) is multiplied by for the UNet's time embedding.
        text_dropout (`float`, 0.1): fraction of training captions replaced by the empty prompt, which is what
            makes classifier-free guidance possible.
        guidance_scale (`float`, 3.0), num_inference_steps (`int`, 25), eta (`float`, 0.0): sampling defaults;
            eta 0 is deterministic, 1 adds DDPM-like noise at each step.
        flow_logit_mean (`float`, 0.0): the flows only: training draws t = sigmoid(n), n ~ Normal(flow_logit_mean, 1)
            (SD3's logit-normal); a positive mean trains more at high noise (Li & He, 2025, shift the same way).
        flow_min_snr_gamma (`float`, 0.0): the flows only: the velocity loss weighs the error of the clean-sprite
            estimate by 1 / t^2, so the nearly clean inputs, where the network only restores detail, dominate the
            gradient; gamma > 0 caps that weight at gamma (Min-SNR-gamma, Hang et al., 2023: at low noise 1 / t^2 is
            about the signal-to-noise ratio they cap; 5 recommended there). Noise levels with t > 1 / sqrt(gamma) keep
            their weight. 0 trains as before.
        flow_loss_pool_sizes (`list[int]`, [1]): the flows only: the velocity loss is summed over these average-pooled
            copies of its error, 1 being the error itself ("simple diffusion", Hoogeboom et al., 2023: its
            multiscale training loss). An error spread over a k x k block counts again in each pool of k or less, an error from
            one pixel to the next only at 1, so [1, 2, 4, 8] weighs the layout and the colour of whole parts (8 to 32
            px) above pixel detail. Each size must divide the side of what the flow draws (latent-flow: its latents).
        flow_shift (`float`, 1.0): the flows only: the Euler steps' noise levels t are shifted to s t / (1 + (s - 1) t),
            so that s > 1 spends more of them at high noise, where the layout of a sprite is decided (SD3's time
            shift, diffusers' `FlowMatchEulerDiscreteScheduler(shift=...)`); 1 spaces them evenly.
        epsilon_scaling (`float`, 1.0): the iterative generators: at each sampling step the noise implied by the
            network's estimate is divided by this before the next step ("epsilon scaling", Ning et al., 2024,
            "Elucidating the Exposure Bias in Diffusion Models"; ComfyUI's EpsilonScaling node). The network was trained
            on real sprites plus noise but samples from its own estimates, whose errors it reads as detail and adds
            up over the steps: a little above 1 stops that, which is what turned mottled bodies into flat colours
            (RESULTS.md: "Exposure bias"). 1 samples as before.
        input_perturbation (`float`, 0.0): the iterative generators, in training only: the network's noisy input is
            built with noise + input_perturbation * fresh noise, while the target keeps the plain noise ("input
            perturbation", Ning et al., 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models"; diffusers'
            train_text_to_image.py `--input_perturbation`, 0.1 recommended). It trains the network on inputs a little
            off the path, as its own earlier steps leave them at sampling. 0 trains as before.
        self_conditioning (`bool`, False): the iterative generators: the UNet also reads its previous estimate of the
            clean sprite, beside the noisy input ("self-conditioning", Chen et al., 2023, "Analog Bits: Generating
            Discrete Data using Diffusion Models with Self-Conditioning"). Each sampling step refines the last one's
            estimate instead of starting over; training costs a forward pass on half of each batch more (a step 38%
            longer on `config/cpu.yaml`). On the CPU hour it smooths the speckle but does not make creatures, and
            leaves 28% fewer steps in equal time (RESULTS.md, "Self-conditioning"). Models saved without it load
            and sample as before.
        augment_conditioning (`bool`, False): the iterative generators: the UNet is told how each training sprite was
            flipped and shifted (the trainer's `hflip` and `max_shift`), through a zero-initialised linear map into its
            timestep embedding, and sampling tells it "not at all" ("non-leaky augmentation", Karras et al., 2022,
            "Elucidating the Design Space of Diffusion-Based Generative Models", appendix on augmentation
            regularisation). A caption then stands for one sprite again instead of fifty flipped and shifted copies,
            so the network need not average them, while it still learns from every copy. Models saved without it
            load and sample as before.
    """

    model_type = "pokesprite"
    # the PyTorch-style names of earlier config.json files (nn.TransformerEncoderLayer's) -> transformers' names
    attribute_map = {"hidden_dim": "hidden_size", "nhead": "num_attention_heads", "num_encoder_layers": "num_hidden_layers"}
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", init_kwargs=BERT_MINI)}

    generator_type: str = "decoder"
    # text encoder
    text_config: dict | PretrainedConfig | None = None
    model_name: str = "prajjwal1/bert-mini"
    hidden_size: int = 256
    num_attention_heads: int = 8
    num_hidden_layers: int = 6
    max_text_length: int = 48
    freeze_text_encoder: bool = True
    # output
    image_size: int = 64
    num_channels: int = 4
    # decoder generator
    noise_dim: int = 100
    text_embedding_dim: int = 256
    base_channels: int = 512
    cross_attention_resolutions: list[int] | tuple[int, ...] = (8, 16, 32)
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    attention_weight: float = 0.01
    # latent-flow generator (and the UNet fields below)
    latent_channels: int = 8
    autoencoder_channels: list[int] | tuple[int, ...] = (16, 64, 128)
    latent_flow_stage: str = "joint"
    # the UNet of the diffusion and both flow generators
    unet_patch_size: int = 1
    unet_channels: list[int] | tuple[int, ...] = (64, 128, 256, 256)
    unet_layers_per_block: int = 1
    unet_symmetric: bool = False
    unet_attention_resolutions: list[int] | tuple[int, ...] = (16, 8)
    unet_pixel_head_channels: int = 0
    num_train_timesteps: int = 1000
    text_dropout: float = 0.1
    guidance_scale: float = 3.0
    num_inference_steps: int = 25
    eta: float = 0.0
    flow_logit_mean: float = 0.0
    flow_min_snr_gamma: float = 0.0
    flow_loss_pool_sizes: list[int] | tuple[int, ...] = (1,)
    flow_shift: float = 1.0
    epsilon_scaling: float = 1.0
    input_perturbation: float = 0.0
    self_conditioning: bool = False
    augment_conditioning: bool = False
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_types_and_ranges()
        if self.generator_type not in GENERATOR_TYPES:
            raise ValueError(f"generator_type must be one of {', '.join(GENERATOR_TYPES)}, got {self.generator_type!r}")
        if self.latent_flow_stage not in LATENT_FLOW_STAGES:
            raise ValueError(f"PokeSpriteConfig.latent_flow_stage must be one of {', '.join(LATENT_FLOW_STAGES)}, got {self.latent_flow_stage!r}")
        if self.num_channels not in (3, 4):
            raise ValueError(f"num_channels must be 3 (RGB) or 4 (RGBA), got {self.num_channels}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        n_up = (self.image_size // 4).bit_length() - 1
        if 4 * 2**n_up != self.image_size:
            raise ValueError(f"image_size must be 4 times a power of two, got {self.image_size}")
        bad = [r for r in self.cross_attention_resolutions if r not in [4 * 2**i for i in range(n_up)]]
        if bad:
            raise ValueError(f"cross_attention_resolutions {bad} are not decoder resolutions below {self.image_size}")
        # every attention splits its feature map's channels among num_attention_heads heads; the decoder halves its channels
        # at each doubling, from base_channels at 4 px
        if self.base_channels < self.image_size:
            raise ValueError(f"base_channels ({self.base_channels}) must be at least image_size ({self.image_size}): the channels halve at every doubling")
        for r in self.cross_attention_resolutions:
            if (self.base_channels * 4 // r) % self.num_attention_heads:
                raise ValueError(f"the decoder has {self.base_channels * 4 // r} channels at {r} px, not a multiple of num_attention_heads ({self.num_attention_heads})")
        if self.unet_patch_size < 1 or self.image_size % self.unet_patch_size:
            raise ValueError(f"unet_patch_size ({self.unet_patch_size}) must divide image_size ({self.image_size})")
        if (self.image_size // self.unet_patch_size) % 2 ** (len(self.unet_channels) - 1):
            raise ValueError(f"the UNet halves image_size / unet_patch_size ({self.image_size // self.unet_patch_size}) "
                             f"{len(self.unet_channels) - 1} times (one less than unet_channels has entries): it must divide evenly")
        unet_sizes = [(self.image_size // self.unet_patch_size) >> i for i in range(len(self.unet_channels))]
        for r, c in zip(unet_sizes, self.unet_channels):
            if (r in self.unet_attention_resolutions or r == unet_sizes[-1]) and c % self.num_attention_heads:
                raise ValueError(f"the UNet has {c} channels at {r} px, where it attends, not a multiple of num_attention_heads ({self.num_attention_heads})")
        if self.unet_pixel_head_channels and self.generator_type in ("diffusion", "flow", "latent-flow") and (
                self.unet_patch_size == 1 or self.generator_type == "latent-flow"):
            raise ValueError(f"PokeSpriteConfig.unet_pixel_head_channels must be 0 for a {self.generator_type} UNet on "
                             f"{'latents' if self.generator_type == 'latent-flow' else 'unfolded pixels (unet_patch_size 1)'}: "
                             f"the head works at full resolution after 4x4 (or larger) patches are unfolded")
        if self.augment_conditioning and self.generator_type == "decoder":
            raise ValueError("PokeSpriteConfig.augment_conditioning is for the iterative generators (diffusion, flow, latent-flow), "
                             "not the decoder")
        if self.generator_type == "latent-flow" and 2 ** (len(self.autoencoder_channels) - 1) != self.unet_patch_size:
            raise ValueError(f"autoencoder_channels has {len(self.autoencoder_channels)} entries, so its encoder halves the sprite "
                             f"{len(self.autoencoder_channels) - 1} times, but unet_patch_size is {self.unet_patch_size}: "
                             f"it needs log2(unet_patch_size) + 1 entries")
        if self.generator_type in ("flow", "latent-flow"):
            flow_side = self.image_size // (self.unet_patch_size if self.generator_type == "latent-flow" else 1)
            if any(flow_side % k for k in self.flow_loss_pool_sizes):
                raise ValueError(f"PokeSpriteConfig.flow_loss_pool_sizes must be pool sizes that divide {flow_side}, the side of "
                                 f"what the {self.generator_type} generator draws, got {self.flow_loss_pool_sizes!r}")
        elif list(self.flow_loss_pool_sizes) != [1]:
            raise ValueError(f"PokeSpriteConfig.flow_loss_pool_sizes is for the flows (flow, latent-flow), not the "
                             f"{self.generator_type} generator: leave it [1]")
        # json gives lists back; keep one type so saved and loaded configs compare equal
        self.cross_attention_resolutions = list(self.cross_attention_resolutions)
        self.unet_channels = list(self.unet_channels)
        self.unet_attention_resolutions = list(self.unet_attention_resolutions)
        self.autoencoder_channels = list(self.autoencoder_channels)
        self.flow_loss_pool_sizes = list(self.flow_loss_pool_sizes)

    def check_types_and_ranges(self):
        """Every numeric field has the right type and a usable value, so a tampered or hand-edited `config.json`
        fails in `from_pretrained` with one line naming the field, not later inside a layer."""
        def fail(name, what):
            raise ValueError(f"PokeSpriteConfig.{name} must be {what}, got {getattr(self, name)!r}")

        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        is_number = lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)
        for name, low in INT_MINIMUMS.items():
            if not is_int(getattr(self, name)) or getattr(self, name) < low:
                fail(name, f"an integer >= {low}")
        for name, (low, high) in FLOAT_RANGES.items():
            value = getattr(self, name)
            if not is_number(value) or not low <= value <= high:
                fail(name, f"a number from {low} to {high}")
        for name in ("cross_attention_resolutions", "unet_channels", "unet_attention_resolutions", "autoencoder_channels",
                     "flow_loss_pool_sizes"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(is_int(v) and v >= 1 for v in value):
                fail(name, "a list of integers >= 1")
        for name in ("unet_channels", "autoencoder_channels", "flow_loss_pool_sizes"):
            if not getattr(self, name):
                fail(name, "a non-empty list")
        for name in ("generator_type", "model_name", "latent_flow_stage"):
            if not isinstance(getattr(self, name), str):
                fail(name, "a string")
        for name in ("freeze_text_encoder", "unet_symmetric", "self_conditioning", "augment_conditioning"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false")


__all__ = ["PokeSpriteConfig"]

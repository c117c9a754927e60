"""PokeSprite: a description goes in, a 64x64 sprite comes out.

One file, read top to bottom: the text encoder every generator shares, the original decoder generator, the UNet
with its iterative generators (diffusion, rectified flow, and rectified flow on an autoencoder's latents),
`GENERATORS`, and `PokeSpriteModel`, which holds the one that `config.generator_type` names.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel
from tqdm.auto import tqdm
from transformers.utils import ModelOutput

try:
    from .configuration_pokesprite import FLOAT_RANGES, INT_MINIMUMS, PokeSpriteConfig
except ImportError:  # imported from a checkout, where the two files are top-level modules rather than a package
    from configuration_pokesprite import FLOAT_RANGES, INT_MINIMUMS, PokeSpriteConfig


# helpers


# augment_conditioning's labels per sprite: data_pokesprite.augment's flip (0 or 1) and x and y shifts (in [-1, 1])
AUGMENT_LABELS = 3


def masked_mean(tokens, mask):
    """Mean over the valid tokens: (B, T, D), (B, T) -> (B, D)."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


def group_norm(channels):
    # GroupNorm, not BatchNorm: a sample's output must not depend on the rest of its batch, so one process and
    # two processes with the same global batch train the same model, and batch-1 generation matches batch 256.
    return nn.GroupNorm(min(32, channels // 4), channels)


def cosine_alpha_sigma(timesteps, num_train_timesteps):
    """Signal and noise scales of the cosine schedule (Nichol & Dhariwal, 2021) with alpha^2 + sigma^2 = 1.

    Computed on the fly instead of stored as a buffer, so nothing needs re-creating after a meta-device load. The
    last step is pure noise (zero terminal SNR), which v-prediction handles and which makes sampling start from
    the same distribution training saw.
    """
    u = (timesteps.float() + 1) / num_train_timesteps
    alpha = torch.cos((u + 0.008) / 1.008 * math.pi / 2).clamp(min=0.0)
    sigma = (1 - alpha**2).clamp(min=0.0).sqrt()
    return alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)


# outputs


@dataclass
class PokeSpriteOutput(ModelOutput):
    """
    loss (`torch.FloatTensor` of shape `()`, returned with `pixel_values`): the weighted training loss.
    images (`torch.FloatTensor` of shape `(batch, num_channels, image_size, image_size)`): sprites in [-1, 1]. With
        `pixel_values`, the iterative generators return their one-step estimate of the clean sprite (latent-flow:
        in eval mode only, since decoding it costs a tenth of a training step).
    l1_loss, mse_loss, attention_loss (`torch.FloatTensor` of shape `()`): the decoder's loss terms, unweighted;
        latent-flow: l1_loss and mse_loss are its autoencoder's reconstruction error.
    loss_per_sample (`torch.FloatTensor` of shape `(batch,)`): the weighted loss of each sample; `loss` is its mean.
    attentions (`tuple(torch.FloatTensor)`, with `output_attentions=True`): one per cross-attention layer, each of
        shape `(batch, height * width, text_length)`, averaged over heads; each row sums to 1 over the valid tokens.
    """

    loss: torch.FloatTensor | None = None
    images: torch.FloatTensor | None = None
    l1_loss: torch.FloatTensor | None = None
    mse_loss: torch.FloatTensor | None = None
    attention_loss: torch.FloatTensor | None = None
    loss_per_sample: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# text encoder


class PokeSpriteTextEncoder(nn.Module):
    """BERT, then a transformer over its tokens at `hidden_size`: the keys and values of every cross-attention."""

    def __init__(self, config):
        super().__init__()
        # no pooler: we pool ourselves, and unused parameters would break DDP once BERT is unfrozen
        self.bert = AutoModel.from_config(config.text_config, add_pooling_layer=False)
        self.proj = nn.Linear(config.text_config.hidden_size, config.hidden_size)
        layer = nn.TransformerEncoderLayer(
            config.hidden_size, config.num_attention_heads, 4 * config.hidden_size, dropout=0.1, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, config.num_hidden_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.frozen = config.freeze_text_encoder
        if self.frozen:
            self.bert.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:  # a frozen BERT stays in eval mode: its dropout would only add noise to fixed features
            self.bert.eval()
        return self

    def bert_hidden_states(self, input_ids, attention_mask):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids, attention_mask, bert_hidden_states=None):
        hidden = bert_hidden_states
        if hidden is None:
            hidden = self.bert_hidden_states(input_ids, attention_mask)
        tokens = self.transformer(self.proj(hidden), src_key_padding_mask=~attention_mask.bool())
        return self.norm(tokens)


class PokeSpriteCrossAttention(nn.Module):
    """Each position of a feature map (query) attends to the text tokens (keys, values); added as a residual."""

    def __init__(self, config, channels):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.norm = group_norm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(config.hidden_size, channels)
        self.to_v = nn.Linear(config.hidden_size, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x, tokens, mask, need_weights=False):
        b, c, h, w = x.shape
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, L, C) -> (B, heads, L, C/heads)
        q = heads(self.to_q(self.norm(x).flatten(2).transpose(1, 2)))
        k, v = heads(self.to_k(tokens)), heads(self.to_v(tokens))
        keep = mask[:, None, None, :].bool()
        if need_weights:  # the explicit form, for the weights; the fused kernel below never materialises them
            scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-1, -2)  # scale q, not the larger score matrix
            weights = scores.float().masked_fill(~keep, float("-inf")).softmax(-1)
            out = weights.to(v.dtype) @ v
            weights = weights.mean(1)
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=keep), None
        out = self.to_out(out.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(b, c, h, w)
        return x + out, weights


# decoder generator (the original design)


class PokeSpriteUpBlock(nn.Module):
    """Double the resolution, two convolutions, then cross-attention if this resolution is in the config."""

    def __init__(self, config, in_channels, out_channels, resolution):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        attend = resolution in config.cross_attention_resolutions
        self.attention = PokeSpriteCrossAttention(config, out_channels) if attend else None

    def forward(self, x, tokens, mask, need_weights):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.silu(self.norm1(self.conv1(x)))
        x = F.silu(self.norm2(self.conv2(x)))
        if self.attention is None:
            return x, None
        return self.attention(x, tokens, mask, need_weights)


class PokeSpriteGenerator(nn.Module):
    """What every generator tells PokeSpriteModel and the trainer about itself. Each subclass adds its `loss` (for
    training) and `sample` (from noise to sprites), and `GENERATORS` below maps `generator_type` to it."""

    attribute_name = None  # where PokeSpriteModel keeps it: the prefix of its weights in model.safetensors
    objective = None  # the training objective, in words, for the model card
    uses_guidance = True  # iterative with classifier-free guidance: guidance_scale and the sampler settings apply
    trains_text = True  # the token transformer (and the empty prompt) learn with it
    init_required = None  # why a run must start from a trained model's weights (--init_from), when it must

    def __init__(self, config):
        super().__init__()
        self.config = config


class PokeSpriteDecoder(PokeSpriteGenerator):
    """The original generator: noise plus pooled text -> a 4x4 map of `base_channels` -> upsampling blocks ->
    `image_size` pixels in [-1, 1], in one pass. Trained with L1 + MSE reconstruction plus attention coverage."""

    attribute_name = "decoder"
    objective = "L1 + MSE + attention coverage"
    uses_guidance = False

    def __init__(self, config):
        super().__init__(config)
        self.text_proj = nn.Linear(config.hidden_size, config.text_embedding_dim)
        self.fc = nn.Linear(config.noise_dim + config.text_embedding_dim, config.base_channels * 16)
        blocks, channels, resolution = [], config.base_channels, 4
        while resolution < config.image_size:
            resolution *= 2
            blocks.append(PokeSpriteUpBlock(config, channels, channels // 2, resolution))
            channels //= 2
        self.blocks = nn.ModuleList(blocks)
        self.to_pixels = nn.Conv2d(channels, config.num_channels, 3, padding=1)

    def forward(self, noise, tokens, mask, need_weights=False):
        text = self.text_proj(masked_mean(tokens, mask))
        x = self.fc(torch.cat([noise.to(tokens.dtype), text], dim=1)).view(-1, self.config.base_channels, 4, 4)
        attentions = []
        for block in self.blocks:
            x, weights = block(x, tokens, mask, need_weights)
            if weights is not None:
                attentions.append(weights)
        return torch.tanh(self.to_pixels(x)), attentions

    def noise_shape(self, batch_size):
        return (batch_size, self.config.noise_dim)

    def draw_timesteps(self, batch_size, generator=None):
        return None  # one pass from noise: there is no noise level to draw

    @staticmethod
    def attention_loss(attentions, mask):
        """Attention coverage: every word of the caption should be looked at somewhere in the sprite.

        For each cross-attention layer, a token's coverage is the attention it receives summed over all positions,
        scaled so that an even share among the valid tokens is 1. The term is the mean of (1 - coverage)^2 over
        valid tokens: the "doubly stochastic" regulariser of Show, Attend and Tell (Xu et al., 2015), applied over
        space instead of time. It keeps the decoder from routing all attention to one token ([CLS], say) and
        ignoring the rest of the description, while each position remains free to attend sharply.

        Returns one value per sample, shape `(batch,)`.
        """
        valid = mask.float()
        n_valid = valid.sum(1)
        terms = []
        for weights in attentions:  # (B, HW, T)
            coverage = weights.float().mean(1) * n_valid[:, None]
            terms.append((((1 - coverage) ** 2) * valid).sum(1) / n_valid)
        return torch.stack(terms).mean(0)

    def loss(self, tokens, mask, pixel_values, noise, timesteps=None, output_attentions=False, augment_labels=None):
        # augment_labels: not read; one pass from noise has nothing to tell apart (the config refuses augment_conditioning)
        c = self.config
        regularise = c.attention_weight > 0 and bool(c.cross_attention_resolutions)
        images, attentions = self(noise, tokens, mask, need_weights=output_attentions or regularise)
        error = images.float() - pixel_values
        l1, mse = error.abs().mean((1, 2, 3)), error.pow(2).mean((1, 2, 3))
        attention = self.attention_loss(attentions, mask) if regularise else torch.zeros_like(l1)
        loss_per_sample = c.l1_weight * l1 + c.mse_weight * mse + c.attention_weight * attention
        return PokeSpriteOutput(
            loss=loss_per_sample.mean(), images=images, l1_loss=l1.mean(), mse_loss=mse.mean(),
            attention_loss=attention.mean(), loss_per_sample=loss_per_sample,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def sample(self, tokens, mask, noise, output_attentions=False):
        images, attentions = self(noise, tokens, mask, need_weights=output_attentions)
        return PokeSpriteOutput(images=images, attentions=tuple(attentions) if output_attentions else None)


# the UNet, shared by the iterative generators


def fresh_noise(shape, generator, device):
    """Gaussian noise on `device`, drawn on the generator's device, so that a seed gives the same sprites on any
    device: the starting noise (`make_noise`) and a stochastic sampling step's."""
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_on).to(device)


def timestep_embedding(timesteps, dim):
    """Sinusoidal features of the noise level (on the 0..num_train_timesteps scale), as in the transformer's
    position encoding."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=timesteps.device) / (dim // 2))
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class PokeSpriteResBlock(nn.Module):
    """Two convolutions with a FiLM (scale and shift) from the timestep-plus-text embedding between them."""

    def __init__(self, in_channels, out_channels, embedding_dim):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(embedding_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, embedding):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(embedding))[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class PokeSpriteAttentionBlock(nn.Module):
    """Self-attention over the feature map (global shape), then cross-attention to the text tokens."""

    def __init__(self, config, channels):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.norm = group_norm(channels)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)
        self.cross_attention = PokeSpriteCrossAttention(config, channels)

    def forward(self, x, tokens, mask, need_weights):
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x).flatten(2).transpose(1, 2))
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + self.to_out(out).transpose(1, 2).reshape(b, c, h, w)
        return self.cross_attention(x, tokens, mask, need_weights)


class PokeSpritePixelHead(nn.Module):
    """`unet_pixel_head_channels` at full resolution: the UNet's unfolded output and the noisy input in, a correction
    to that output out. Zero at first (its last layer starts at zero), so it starts as the UNet without it."""

    def __init__(self, config, embedding_dim):
        super().__init__()
        channels, c = config.unet_pixel_head_channels, config.num_channels
        self.conv1 = nn.Conv2d(2 * c, channels, 3, padding=1)
        self.film = nn.Linear(embedding_dim, 2 * channels)
        self.conv2 = nn.Conv2d(channels, c, 3, padding=1)
        self.conv2.zero_init = True

    def forward(self, x, embedding):
        scale, shift = self.film(F.silu(embedding))[:, :, None, None].chunk(2, dim=1)
        return self.conv2(F.silu(self.conv1(x) * (1 + scale) + shift))


class PokeSpriteUNetLevel(nn.Module):
    """One resolution of the UNet: residual blocks (with attention where the config asks) and a resampler."""

    def __init__(self, config, block_in_channels, out_channels, resolution, resample=None):
        super().__init__()
        embedding_dim = 4 * config.unet_channels[0]
        self.resnets = nn.ModuleList(PokeSpriteResBlock(c, out_channels, embedding_dim) for c in block_in_channels)
        attend = resolution in config.unet_attention_resolutions
        self.attentions = (
            nn.ModuleList(PokeSpriteAttentionBlock(config, out_channels) for _ in block_in_channels) if attend else None
        )
        self.resample = resample


class PokeSpriteUNet(PokeSpriteGenerator):
    """A DDPM-style UNet over a noisy sprite, its noise level and the text; the two iterative generators below
    subclass it with their own objective and sampler.

    With `unet_patch_size` p > 1 the sprite is first folded into p x p patches (pixel-unshuffle: 64x64x4 becomes
    16x16x64 for p = 4) and unfolded at the end: the convolutions then run at 64/p px and below, where a CPU spends
    a fraction of the FLOPs, at little cost in quality ("simple diffusion", Hoogeboom et al., 2023).
    The down path keeps every block's output as a skip connection; in diffusers' layout (the default) it also keeps
    the input convolution's and every downsampler's, and the up path has one block more per resolution to take them
    back. With `unet_symmetric` the up path mirrors the down path, one skip per block. The noise level and the
    pooled text enter every residual block through FiLM, the tokens through cross-attention at
    `unet_attention_resolutions` and in the middle block. With `unet_pixel_head_channels` a small head at full
    resolution corrects the unfolded output from the noisy input (PokeSpritePixelHead).
    """

    attribute_name = "unet"

    def __init__(self, config, in_channels=None):
        """`in_channels`: the UNet works on maps of that many channels at image_size / unet_patch_size px (the
        latent flow's latents) instead of on the sprite folded into patches."""
        super().__init__(config)
        channels, n, p = config.unet_channels, config.unet_layers_per_block, config.unet_patch_size
        self.fold = in_channels is None and p > 1
        self.base = channels[0]
        embedding_dim = 4 * self.base
        self.time_mlp = nn.Sequential(nn.Linear(self.base, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
        self.text_mlp = nn.Linear(config.hidden_size, embedding_dim)
        # augment_conditioning: how the training sprite was flipped and shifted, read like the noise level. No bias and
        # zero at first, so the labels of an unaugmented sprite (zeros, what sampling passes) add nothing
        self.augment_mlp = nn.Linear(AUGMENT_LABELS, embedding_dim, bias=False) if config.augment_conditioning else None
        if self.augment_mlp is not None:
            self.augment_mlp.zero_init = True
        self.in_channels = in_channels or config.num_channels * p * p
        # with self-conditioning the previous estimate comes in beside the noisy input, folded the same way
        self.conv_in = nn.Conv2d(self.in_channels * (2 if config.self_conditioning else 1), self.base, 3, padding=1)

        # the channels of each skip connection, in the order the down path makes them
        symmetric = config.unet_symmetric
        self.down, skips, ch = nn.ModuleList(), [] if symmetric else [self.base], self.base
        for level, out_ch in enumerate(channels):
            last = level == len(channels) - 1
            downsample = None if last else nn.Conv2d(out_ch, out_ch, 3, stride=2, padding=1)
            self.down.append(PokeSpriteUNetLevel(config, [ch] + [out_ch] * (n - 1), out_ch, (config.image_size // p) >> level, downsample))
            skips += [out_ch] * (n if last or symmetric else n + 1)
            ch = out_ch

        self.mid_resnet1 = PokeSpriteResBlock(ch, ch, embedding_dim)
        self.mid_attention = PokeSpriteAttentionBlock(config, ch)
        self.mid_resnet2 = PokeSpriteResBlock(ch, ch, embedding_dim)

        self.up = nn.ModuleList()
        for level, out_ch in reversed(list(enumerate(channels))):
            block_in = []
            for _ in range(n if symmetric else n + 1):
                block_in.append(ch + skips.pop())
                ch = out_ch
            upsample = nn.Upsample(scale_factor=2.0, mode="nearest") if level > 0 else None
            self.up.append(PokeSpriteUNetLevel(config, block_in, out_ch, (config.image_size // p) >> level, upsample))

        self.norm_out = group_norm(self.base)
        self.conv_out = nn.Conv2d(self.base, self.in_channels, 3, padding=1)
        # a zero output layer makes the untrained UNet predict 0, a calm start for either objective
        self.conv_out.zero_init = True
        self.pixel_head = PokeSpritePixelHead(config, embedding_dim) if self.fold and config.unet_pixel_head_channels else None

    def forward(self, x, timesteps, tokens, mask, need_weights=False, x0_prev=None, augment_labels=None):
        """`x0_prev`: with `self_conditioning`, the previous estimate of the clean sample (zeros, the default, when
        there is none yet). `augment_labels`: with `augment_conditioning`, each training sprite's (flip, x shift, y
        shift) from `data_pokesprite.augment`; None, as at sampling, is an unaugmented sprite."""
        noisy = x
        if self.config.self_conditioning:
            x = torch.cat([x, torch.zeros_like(x) if x0_prev is None else x0_prev.to(x.dtype)], dim=1)
        embedding = self.time_mlp(timestep_embedding(timesteps, self.base)) + self.text_mlp(masked_mean(tokens, mask))
        if self.augment_mlp is not None and augment_labels is not None:
            embedding = embedding + self.augment_mlp(augment_labels.to(embedding.dtype))
        attentions = []

        def block(level, i, h):
            h = level.resnets[i](h, embedding)
            if level.attentions is None:
                return h
            h, weights = level.attentions[i](h, tokens, mask, need_weights)
            if need_weights:
                attentions.append(weights)
            return h

        p = self.config.unet_patch_size
        h = self.conv_in(F.pixel_unshuffle(x, p) if self.fold else x)
        symmetric = self.config.unet_symmetric
        skips = [] if symmetric else [h]
        for level in self.down:
            for i in range(len(level.resnets)):
                h = block(level, i, h)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                if not symmetric:
                    skips.append(h)

        h = self.mid_resnet1(h, embedding)
        h, weights = self.mid_attention(h, tokens, mask, need_weights)
        if need_weights:
            attentions.append(weights)
        h = self.mid_resnet2(h, embedding)

        for level in self.up:
            for i in range(len(level.resnets)):
                h = block(level, i, torch.cat([h, skips.pop()], dim=1))
            if level.resample is not None:
                h = level.resample(h)

        out = self.conv_out(F.silu(self.norm_out(h)))
        if not self.fold:
            return out, attentions
        out = F.pixel_shuffle(out, p)
        if self.pixel_head is not None:
            out = out + self.pixel_head(torch.cat([out, noisy], dim=1), embedding)
        return out, attentions

    def noise_shape(self, batch_size):
        c = self.config
        return (batch_size, c.num_channels, c.image_size, c.image_size)

    def input_noise(self, noise):
        """The noise the UNet's training input is built with. With input_perturbation (Ning et al., 2023) it is a
        little off the noise the target is computed from, as a sampling step's input is off the true path after
        the network's own earlier errors; evaluation keeps it exact, so the validation loss stays comparable."""
        if not self.training or self.config.input_perturbation == 0:
            return noise
        return noise + self.config.input_perturbation * torch.randn_like(noise)

    def unet_time(self, t):
        """The generator's noise level on the scale the UNet's timestep embedding reads (0..num_train_timesteps)."""
        return t

    def self_condition(self, x, t, tokens, mask, augment_labels=None):
        """The previous-estimate input of a training pass with `self_conditioning` (Chen et al., 2023, "Analog
        Bits"), None without it.

        At sampling, each step hands its clean estimate to the next, so the network refines its own estimate
        instead of starting over from the noisy input alone. Training teaches that on half of each batch: the network
        first estimates from this same input without a gradient, and the loss pass gets that estimate; the other
        half gets zeros, as the first sampling step does. That costs a forward pass on half the batch: on the CPU
        preset a step takes 38% longer (benchmarks/results/self_conditioning_cpu.json). In evaluation the whole batch
        gets the estimate, so the validation loss is deterministic.
        """
        if not self.config.self_conditioning:
            return None
        b = x.shape[0]
        chosen = torch.rand(b, device=x.device) < 0.5 if self.training else torch.ones(b, dtype=torch.bool, device=x.device)
        x0_prev = torch.zeros_like(x)
        if chosen.any():
            with torch.no_grad():
                labels = None if augment_labels is None else augment_labels[chosen]
                out, _ = self(x[chosen], self.unet_time(t[chosen]), tokens[chosen], mask[chosen], augment_labels=labels)
                x0_prev[chosen] = self.clean_estimate(x[chosen], out.float(), t[chosen]).to(x.dtype)
        return x0_prev

    def predict(self, x, t, tokens, mask, guidance_scale, need_weights, x0_prev=None):
        """The UNet's output for `x` at noise level `t` (a scalar on the generator's scale), given the previous
        step's clean estimate `x0_prev` where the UNet is self-conditioned.

        For classifier-free guidance (Ho & Salimans, 2022) `tokens` and `mask` hold the captions and then the empty
        prompt: one UNet call for both branches, mixed as null + scale * (text - null). Attentions are the
        captions' branch only.
        """
        b = x.shape[0]
        guided = tokens.shape[0] == 2 * b
        x_in = torch.cat([x, x]) if guided else x
        if x0_prev is not None and guided:  # both branches refine the same, guided estimate
            x0_prev = torch.cat([x0_prev, x0_prev])
        out, attentions = self(x_in.to(tokens.dtype), self.unet_time(t).expand(x_in.shape[0]), tokens, mask, need_weights,
                               x0_prev)
        out = out.float()
        if guided:
            text, null = out.chunk(2)
            out = null + guidance_scale * (text - null)
        return out, [a[:b].float() for a in attentions]

    def sample(self, tokens, mask, noise, guidance_scale, num_inference_steps, eta=0.0, flow_shift=1.0, epsilon_scaling=1.0,
               generator=None, output_attentions=False, progress_bar=False):
        """From pure noise to a sprite in `num_inference_steps` calls of the UNet at the subclass's
        `sampling_times`, each followed by its `step`. Cross-attention weights are averaged over the steps."""
        x = noise.float()
        times = self.sampling_times(num_inference_steps, x.device, flow_shift)
        attention_sums = None
        x0_prev = torch.zeros_like(x) if self.config.self_conditioning else None
        for i in tqdm(range(num_inference_steps), desc="sampling", leave=False, disable=not progress_bar):
            out, attentions = self.predict(x, times[i], tokens, mask, guidance_scale, output_attentions, x0_prev)
            if x0_prev is not None:
                x0_prev = self.clean_estimate(x, out, times[i])
            last = i == num_inference_steps - 1
            x = self.step(x, out, times[i], times[i + 1], last, eta, epsilon_scaling, generator)
            if output_attentions:
                attentions = [a / num_inference_steps for a in attentions]
                attention_sums = attentions if attention_sums is None else [s + a for s, a in zip(attention_sums, attentions)]
        return PokeSpriteOutput(images=x, attentions=tuple(attention_sums) if output_attentions else None)


class PokeSpriteDiffusion(PokeSpriteUNet):
    """Diffusion: v-prediction (Salimans & Ho, 2022) on the cosine schedule, sampled with DDIM (Song et al., 2021)."""

    objective = "v-prediction MSE"

    def draw_timesteps(self, batch_size, generator=None):
        return torch.randint(0, self.config.num_train_timesteps, (batch_size,), generator=generator)

    def loss(self, tokens, mask, pixel_values, noise, timesteps, output_attentions=False, augment_labels=None):
        alpha, sigma = cosine_alpha_sigma(timesteps, self.config.num_train_timesteps)
        noisy = alpha * pixel_values + sigma * self.input_noise(noise)
        x_in = noisy.to(tokens.dtype)
        x0_prev = self.self_condition(x_in, timesteps, tokens, mask, augment_labels)
        v, attentions = self(x_in, timesteps, tokens, mask, output_attentions, x0_prev, augment_labels)
        v = v.float()
        # v-prediction: a target of the same scale at every noise level
        loss_per_sample = (v - (alpha * noise - sigma * pixel_values)).pow(2).mean((1, 2, 3))
        return PokeSpriteOutput(
            loss=loss_per_sample.mean(), loss_per_sample=loss_per_sample, images=(alpha * noisy - sigma * v).clamp(-1, 1),
            attentions=tuple(attentions) if output_attentions else None,
        )

    def sampling_times(self, steps, device, flow_shift):
        # flow_shift: flow only; DDIM's steps are evenly spaced
        return torch.linspace(self.config.num_train_timesteps - 1, 0, steps + 1, device=device).round().long()

    def clean_estimate(self, x, v, t):
        alpha, sigma = cosine_alpha_sigma(t.expand(x.shape[0]), self.config.num_train_timesteps)
        return (alpha * x - sigma * v).clamp(-1, 1)

    def step(self, x, v, t, t_next, last, eta, epsilon_scaling, generator):
        T = self.config.num_train_timesteps
        b = x.shape[0]
        alpha, sigma = cosine_alpha_sigma(t.expand(b), T)
        x0 = self.clean_estimate(x, v, t)
        if last:
            return x0
        eps = (x - alpha * x0) / sigma / epsilon_scaling
        alpha_next, sigma_next = cosine_alpha_sigma(t_next.expand(b), T)
        # eta = 0: deterministic DDIM; eta = 1: the DDPM posterior's noise level
        noise_scale = eta * (sigma_next / sigma) * (1 - (alpha / alpha_next) ** 2).clamp(min=0).sqrt()
        x = alpha_next * x0 + (sigma_next**2 - noise_scale**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x = x + noise_scale * fresh_noise(x.shape, generator, x.device)
        return x


class PokeSpriteFlow(PokeSpriteUNet):
    """Rectified flow (Liu et al., 2022; Esser et al., 2024): x_t = (1 - t) x0 + t noise, a straight path from the
    sprite (t = 0) to noise (t = 1), sampled with Euler steps along the predicted velocity noise - x0.

    - The UNet predicts the clean sprite x0, and the loss is on the velocity it implies, (x_t - x0_hat) / t
      ("Back to Basics: Let Denoising Generative Models Denoise", Li & He, 2025). With 4x4x4 = 64 values per
      patch, predicting the clean, smooth sprite instead of the noise keeps the patches from turning to speckle.
    - t is drawn logit-normal (SD3's choice): most training goes to the middle noise levels, where the shape forms.
    """

    objective = "rectified-flow velocity MSE"
    # t below this would blow up the velocity's division; there the sprite is all but clean anyway
    min_t = 0.05

    def draw_timesteps(self, batch_size, generator=None):
        return torch.sigmoid(torch.randn(batch_size, generator=generator) + self.config.flow_logit_mean)

    def velocity(self, x, x0, t):
        return (x - x0) / t.view(-1, 1, 1, 1).clamp(min=self.min_t)

    def loss(self, tokens, mask, pixel_values, noise, timesteps, output_attentions=False, augment_labels=None):
        t = timesteps.float().view(-1, 1, 1, 1)
        noisy = (1 - t) * pixel_values + t * noise
        x_in = ((1 - t) * pixel_values + t * self.input_noise(noise)).to(tokens.dtype)
        x0_prev = self.self_condition(x_in, timesteps, tokens, mask, augment_labels)
        x0, attentions = self(x_in, self.unet_time(timesteps), tokens, mask, output_attentions, x0_prev, augment_labels)
        x0 = x0.float()
        # against the unperturbed path: (noisy - x0_hat) / t - (noise - x0) = (x0 - x0_hat) / t, so a perturbed input
        # still asks for the clean sprite
        error = self.velocity(noisy, x0, timesteps) - (noise - pixel_values)
        # the multiscale loss (PokeSpriteConfig.flow_loss_pool_sizes); [1] is the plain velocity MSE
        loss_per_sample = sum(F.avg_pool2d(error, k).pow(2).mean((1, 2, 3)) for k in self.config.flow_loss_pool_sizes)
        gamma = self.config.flow_min_snr_gamma
        if gamma > 0:  # Min-SNR: the x0 error's weight 1 / t^2 capped at gamma (PokeSpriteConfig)
            loss_per_sample = loss_per_sample * (gamma * t.flatten().clamp(min=self.min_t) ** 2).clamp(max=1)
        return PokeSpriteOutput(
            loss=loss_per_sample.mean(), loss_per_sample=loss_per_sample, images=x0.clamp(-1, 1),
            attentions=tuple(attentions) if output_attentions else None,
        )

    def sampling_times(self, steps, device, flow_shift):
        # SD3's time shift: flow_shift > 1 spends more of the steps at high noise, where the layout is decided
        t = torch.linspace(1, 0, steps + 1, device=device)
        return flow_shift * t / (1 + (flow_shift - 1) * t)

    def unet_time(self, t):
        return t * self.config.num_train_timesteps

    def clean_estimate(self, x, x0, t):
        return x0.clamp(-1, 1)

    def step(self, x, x0, t, t_next, last, eta, epsilon_scaling, generator):
        x0 = self.clean_estimate(x, x0, t)
        if eta == 0 and epsilon_scaling == 1:  # Euler along the velocity; at t_next = 0 this lands exactly on x0
            return x + (t_next - t) * self.velocity(x, x0, t.expand(x.shape[0]))
        # The Euler step written as x_next = (1 - t_next) x0 + t_next noise_hat. epsilon_scaling shrinks noise_hat,
        # the noise the estimate implies, which also holds the estimate's own errors (PokeSpriteConfig). DDIM's eta
        # swaps a share of it for fresh noise (1: all of it), which pulls a drifting trajectory back towards what the
        # network was trained on (RESULTS.md: smoother, more compact sprites)
        noise = (x - (1 - t) * x0) / t / epsilon_scaling
        return (1 - t_next) * x0 + t_next * ((1 - eta**2) ** 0.5 * noise + eta * fresh_noise(x.shape, generator, x.device))


class PokeSpriteAutoencoder(nn.Module):
    """Sprite <-> latent: convolutions that halve the sprite down to image_size / unet_patch_size px and end in
    `latent_channels` squashed to [-1, 1] by tanh (the range the flow's x0 clamp expects), and a decoder that
    mirrors them. Plain convolutions: they run at 64 and 32 px, where the CPU can afford only a few."""

    def __init__(self, config):
        super().__init__()
        channels = config.autoencoder_channels
        encoder = [nn.Conv2d(config.num_channels, channels[0], 3, padding=1)]
        for c_in, c_out in zip(channels, channels[1:]):
            encoder += [nn.SiLU(), nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]
        encoder += [nn.SiLU(), nn.Conv2d(channels[-1], config.latent_channels, 3, padding=1), nn.Tanh()]
        self.encoder = nn.Sequential(*encoder)
        decoder = [nn.Conv2d(config.latent_channels, channels[-1], 3, padding=1)]
        for c_in, c_out in zip(channels[::-1], channels[::-1][1:]):
            decoder += [nn.SiLU(), nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1)]
        decoder += [nn.SiLU(), nn.Conv2d(channels[0], config.num_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)

    def encode(self, pixel_values):
        return self.encoder(pixel_values)

    def decode(self, latents):
        return self.decoder(latents)


class PokeSpriteLatentFlow(PokeSpriteFlow):
    """Rectified flow on the latents of a small autoencoder. The flow UNet decides the layout at
    image_size / unet_patch_size px; the decoder, trained only on real sprites, draws each patch's pixels, which is
    what the pixel-space flow's mottled interiors show it failing to do (RESULTS.md).

    `latent_flow_stage` says what trains. "joint": both, one loss; the flow sees the latents without a gradient
    into the encoder, so it cannot pull them towards what is easy to denoise, but it chases latents that are still
    changing. "autoencoder" then "flow" (`--init_from` the first's model): the autoencoder first, then the flow on
    its frozen latents, a fixed target from the first step (Rombach et al., 2022, train them in that order).
    """

    objective = ("by latent_flow_stage: rectified-flow velocity MSE on the latents + L1 + MSE reconstruction (joint), "
                 "the reconstruction alone (autoencoder) or the velocity MSE alone (flow)")

    def __init__(self, config):
        super().__init__(config, in_channels=config.latent_channels)
        self.autoencoder = PokeSpriteAutoencoder(config)
        self.stage = config.latent_flow_stage
        # requires_grad tells the optimizer (and DDP) what this stage trains
        if self.stage == "flow":
            self.autoencoder.requires_grad_(False)
            self.init_required = ("latent_flow_stage 'flow' keeps the autoencoder frozen, so it must start trained: "
                                  "start from the autoencoder stage's model")
        if self.stage == "autoencoder":
            for name, module in self.named_children():
                module.requires_grad_(name == "autoencoder")
            self.trains_text = False

    def noise_shape(self, batch_size):
        c = self.config
        size = c.image_size // c.unet_patch_size
        return (batch_size, c.latent_channels, size, size)

    def loss(self, tokens, mask, pixel_values, noise, timesteps, output_attentions=False, augment_labels=None):
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage != "flow"):
            latents = self.autoencoder.encode(pixel_values)
        reconstruction_loss, terms = 0, {}
        if self.stage != "flow":
            reconstruction = self.autoencoder.decode(latents)
            error = reconstruction.float() - pixel_values
            l1, mse = error.abs().mean((1, 2, 3)), error.pow(2).mean((1, 2, 3))
            reconstruction_loss, terms = l1 + mse, {"l1_loss": l1.mean(), "mse_loss": mse.mean()}
        if self.stage == "autoencoder":  # nothing else learns, so the flow is not run
            return PokeSpriteOutput(loss=reconstruction_loss.mean(), loss_per_sample=reconstruction_loss,
                                    images=reconstruction.float().clamp(-1, 1), **terms)
        flow = super().loss(tokens, mask, latents.detach().float(), noise, timesteps, output_attentions, augment_labels)
        loss_per_sample = flow.loss_per_sample + reconstruction_loss
        images = None
        if not self.training:  # decoding the estimate would add a tenth to a training step that never reads it
            with torch.no_grad():
                images = self.autoencoder.decode(flow.images.to(latents.dtype)).float().clamp(-1, 1)
        return PokeSpriteOutput(loss=loss_per_sample.mean(), loss_per_sample=loss_per_sample, images=images,
                                attentions=flow.attentions, **terms)

    def sample(self, tokens, *args, **kwargs):
        """The flow's sampler in latent space (its arguments), then one decode to pixels."""
        latents = super().sample(tokens, *args, **kwargs)
        images = self.autoencoder.decode(latents.images.to(tokens.dtype)).float().clamp(-1, 1)
        return PokeSpriteOutput(images=images, attentions=latents.attentions)


# the one place a generator type becomes a class
GENERATORS = {"decoder": PokeSpriteDecoder, "diffusion": PokeSpriteDiffusion, "flow": PokeSpriteFlow,
              "latent-flow": PokeSpriteLatentFlow}


# model


class PokeSpriteModel(PreTrainedModel):
    """Text to sprite: the text encoder, then the generator that `config.generator_type` names (see `GENERATORS`).

    - "decoder", the original design: a CNN decoder maps noise plus text to a sprite in one pass, trained with
      L1 + MSE reconstruction plus the attention coverage term.
    - "diffusion": a UNet denoises pure noise into a sprite in `num_inference_steps` DDIM steps, with
      classifier-free guidance; trained with the v-prediction objective.
    - "flow": the same UNet family on 4x4 patches, trained as a rectified flow and sampled with Euler steps: the
      design that trains in an hour on a CPU.
    - "latent-flow": the flow UNet on the latents of a small autoencoder trained with it or before it
      (`latent_flow_stage`), decoded once at the end.

    Every generator has the same small interface, `loss(...)` and `sample(...)`; this class draws the noise,
    replaces dropped captions with the learned empty prompt, and hands the rest to the generator.
    """

    config_class = PokeSpriteConfig
    base_model_prefix = "pokesprite"
    main_input_name = "input_ids"
    _no_split_modules = ["PokeSpriteUpBlock", "PokeSpriteResBlock", "PokeSpriteAttentionBlock"]

    def __init__(self, config):
        super().__init__(config)
        self.text_encoder = PokeSpriteTextEncoder(config)
        generator = GENERATORS[config.generator_type](config)
        # under its own name ("decoder", "unet"), so the weights of every model saved so far keep their keys
        self.add_module(generator.attribute_name, generator)
        if generator.uses_guidance:
            # the "empty prompt": one learned token that replaces a dropped caption, and the unconditional branch
            # of classifier-free guidance at generation
            self.null_tokens = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        if not generator.trains_text:  # e.g. the latent flow's autoencoder stage: the captions go unread
            self.text_encoder.requires_grad_(False)
            if generator.uses_guidance:
                self.null_tokens.requires_grad_(False)
        self._tokenizer = None
        self.post_init()

    @property
    def generator(self):
        return getattr(self, GENERATORS[self.config.generator_type].attribute_name)

    @property
    def uses_guidance(self):
        """Whether the generator samples iteratively with classifier-free guidance (`guidance_scale` and
        `num_inference_steps` apply)."""
        return self.generator.uses_guidance

    def _init_weights(self, module):
        # torch.nn.init calls here are guarded by transformers: weights loaded from a checkpoint are left alone.
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            # the flag sits on the layer itself: transformers skips modules without parameters of their own
            (nn.init.zeros_ if getattr(module, "zero_init", False) else nn.init.xavier_uniform_)(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            module._reset_parameters()
        elif isinstance(module, PokeSpriteModel) and hasattr(module, "null_tokens"):
            nn.init.normal_(module.null_tokens, std=self.config.initializer_range)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, revision=None, **kwargs):
        """`PreTrainedModel.from_pretrained`, remembering what was loaded: a Hub `revision` (a branch by default) is
        resolved once, to the commit it points to now, and whatever the model loads later (its tokenizer) comes from
        that same commit, wherever the branch has moved by then. `model.revision` is that commit."""
        revision = cls._resolve_revision(pretrained_model_name_or_path, revision, kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, revision=revision, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        # where the tokenizer is loaded from: the same commit, cache, subfolder and credentials as the model
        model._hub_kwargs = {"revision": getattr(revision, "resolved", revision), **{
            k: kwargs[k] for k in ("cache_dir", "local_files_only", "subfolder", "token") if kwargs.get(k) is not None}}
        return loaded

    @staticmethod
    def _resolve_revision(name_or_path, revision, kwargs=None):
        """The commit `revision` of the Hub repo `name_or_path` points to now (a `ResolvedRevision`, a str equal to
        `revision` whose `.resolved` is the commit), as transformers resolves it; `revision` unchanged for a folder,
        offline without a cached answer, or with a transformers that cannot resolve revisions."""
        try:
            from transformers.utils.hub import resolve_revision
        except ImportError:
            return revision
        kwargs = kwargs or {}
        return resolve_revision(name_or_path, revision, token=kwargs.get("token"), cache_dir=kwargs.get("cache_dir"),
                                local_files_only=bool(kwargs.get("local_files_only")))

    @staticmethod
    def shareable_name(name_or_path):
        """How a saved model names something it was made from (its BERT; in the trainer's card, the dataset too),
        since `config.json` and the card are shared: a Hub id as it is; a local folder by the Hub id it is a cached
        snapshot of (`.../models--org--name/snapshots/<sha>`), else by its bare name. Never a path of this machine."""
        import os
        import re
        from pathlib import Path

        name = str(name_or_path)
        if not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
            return name  # a Hub id
        parts = Path(os.path.abspath(os.path.expanduser(name))).parts
        for folder, subfolder in zip(parts, parts[1:]):
            cached = re.fullmatch(r"(?:models|datasets|spaces)--(.+)", folder)
            if cached and subfolder == "snapshots":
                return cached.group(1).replace("--", "/")  # the Hub forbids "--" in names, so this is unambiguous
        return parts[-1]

    @classmethod
    def from_text_encoder(cls, name_or_path, revision=None, **config_kwargs):
        """A new model for training, whose BERT starts from the pretrained `name_or_path` (a Hub id or a folder).

        This is the only place a pretrained BERT is downloaded: its config is copied into `PokeSpriteConfig`, so
        a saved PokeSprite model rebuilds the encoder from `config.json` and loads every weight from its own file.
        BERT and its tokenizer come from one commit of `revision`. `config.model_name` (and the copied config's
        `_name_or_path`) record `shareable_name(name_or_path)`; pass `model_name=` to name a local copy's Hub id.
        """
        revision = cls._resolve_revision(name_or_path, revision)
        # fp32 whatever the checkpoint stores: mixed precision is the trainer's choice, and the config copied below
        # must not carry a half-precision dtype into every model built from it
        bert = AutoModel.from_pretrained(name_or_path, add_pooling_layer=False, dtype=torch.float32, revision=revision)
        name = config_kwargs.pop("model_name", None) or cls.shareable_name(name_or_path)
        text_config = {**bert.config.to_dict(), "_name_or_path": name}
        config = PokeSpriteConfig(text_config=text_config, model_name=name, **config_kwargs)
        model = cls(config)
        model.text_encoder.bert.load_state_dict(bert.state_dict())
        model._tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        return model

    # forward

    def forward(
        self,
        input_ids,
        attention_mask=None,
        noise=None,
        pixel_values=None,
        timesteps=None,
        output_attentions=False,
        generator=None,
        bert_hidden_states=None,
        guidance_scale=None,
        num_inference_steps=None,
        eta=None,
        flow_shift=None,
        epsilon_scaling=None,
        progress_bar=False,
        augment_labels=None,
        return_dict=True,
    ):
        r"""
        input_ids, attention_mask (`torch.LongTensor` of shape `(batch, text_length)`): the tokenised captions.
        noise (`torch.FloatTensor`, *optional*): the randomness of the sprite, of shape `make_noise`'s. Decoder:
            `(batch, noise_dim)`. Diffusion and flow: the starting noise `(batch, num_channels, image_size,
            image_size)` (latent-flow: of the latent's shape); with `pixel_values`, the noise added to them. Drawn
            from the global RNG when not given.
        pixel_values (`torch.FloatTensor` of shape `(batch, num_channels, image_size, image_size)`, in [-1, 1]): the
            target sprites. When given, the output holds the training loss and its terms.
        timesteps (`torch.Tensor` of shape `(batch,)`, iterative generators only): the noise level of each training
            sample (integers for diffusion, t in (0, 1) for the flows); drawn at random when not given (fix it, with
            `noise`, for a deterministic validation loss: `model.generator.draw_timesteps`).
        generator (`torch.Generator`, iterative sampling only): the randomness of the steps when `eta > 0`.
        bert_hidden_states (`torch.FloatTensor` of shape `(batch, text_length, bert_hidden_size)`, *optional*): BERT's
            output for `input_ids`, computed once in advance. A frozen BERT gives the same features every epoch, so
            the trainer caches them instead of running BERT at every step.
        guidance_scale, num_inference_steps, eta, flow_shift, epsilon_scaling, progress_bar (iterative sampling only): as in
            `generate`; the config's by default, and no progress bar.
        augment_labels (`torch.FloatTensor` of shape `(batch, 3)`, *optional*, training only): how each of
            `pixel_values` was flipped and shifted (`data_pokesprite.augment`'s labels). Read where
            `config.augment_conditioning` is set, ignored elsewhere; None is an unaugmented sprite.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool()
        tokens = self.text_encoder(input_ids, attention_mask, bert_hidden_states)
        b = tokens.shape[0]
        if noise is None:
            noise = torch.randn(self.generator.noise_shape(b), device=tokens.device)
        if pixel_values is None:
            output = self._sample(tokens, mask, noise, generator, guidance_scale, num_inference_steps, eta,
                                  flow_shift, epsilon_scaling, output_attentions, progress_bar)
        else:
            if timesteps is None:
                timesteps = self.generator.draw_timesteps(b)
            if timesteps is not None:
                timesteps = timesteps.to(tokens.device)
            if self.training and self.uses_guidance and self.config.text_dropout > 0:
                drop = torch.rand(b, device=tokens.device) < self.config.text_dropout
                null_tokens, null_mask = self._null_text(tokens, mask)
                tokens = torch.where(drop[:, None, None], null_tokens, tokens)
                mask = torch.where(drop[:, None], null_mask, mask)
            if augment_labels is not None:
                augment_labels = augment_labels.to(tokens.device)
            output = self.generator.loss(tokens, mask, pixel_values, noise, timesteps, output_attentions, augment_labels)
        return output if return_dict else output.to_tuple()

    def _null_text(self, tokens, mask):
        """The empty prompt, shaped like a batch of captions: the learned null token, then padding."""
        null_tokens = self.null_tokens.to(tokens.dtype).expand(tokens.shape[0], tokens.shape[1], -1)
        null_mask = torch.zeros_like(mask)
        null_mask[:, 0] = True
        return null_tokens, null_mask

    def _sample(self, tokens, mask, noise, generator, guidance_scale, num_inference_steps, eta, flow_shift,
                epsilon_scaling, output_attentions, progress_bar):
        if not self.uses_guidance:
            return self.generator.sample(tokens, mask, noise, output_attentions=output_attentions)
        c = self.config
        options = {"guidance_scale": c.guidance_scale if guidance_scale is None else guidance_scale,
                   "eta": c.eta if eta is None else eta, "flow_shift": c.flow_shift if flow_shift is None else flow_shift,
                   "epsilon_scaling": c.epsilon_scaling if epsilon_scaling is None else epsilon_scaling}
        for name, value in options.items():  # the config checks its own; a keyword out of range would give NaN sprites
            low, high = FLOAT_RANGES[name]
            if not low <= value <= high:
                raise ValueError(f"{name} must be from {low} to {high}, got {value}")
        steps = c.num_inference_steps if num_inference_steps is None else num_inference_steps
        if steps < INT_MINIMUMS["num_inference_steps"]:
            raise ValueError(f"num_inference_steps must be at least {INT_MINIMUMS['num_inference_steps']}, got {steps}")
        if options["guidance_scale"] != 1.0:  # the captions, then the empty prompt: the generator runs both branches at once
            null_tokens, null_mask = self._null_text(tokens, mask)
            tokens, mask = torch.cat([tokens, null_tokens]), torch.cat([mask, null_mask])
        return self.generator.sample(tokens, mask, noise, **options, num_inference_steps=steps, generator=generator,
                                     output_attentions=output_attentions, progress_bar=progress_bar)

    # generation

    @property
    def tokenizer(self):
        """The tokenizer saved next to the model (or of the BERT it was created from), loaded on first use from the
        commit the model was loaded from (`revision`), not from wherever the repo's branch points by then."""
        if self._tokenizer is None:
            # trust_remote_code: AutoTokenizer reads config.json, whose auto_map points at this very file
            self._tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, trust_remote_code=True,
                                                            **getattr(self, "_hub_kwargs", {}))
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer):
        self._tokenizer = tokenizer

    @property
    def revision(self):
        """The commit of the Hub repo this model was loaded from (what `from_pretrained` resolved its `revision`
        to; the revision as given where it could not be resolved, offline say); None for a folder or a new model."""
        return getattr(self, "_hub_kwargs", {}).get("revision")

    def tokenize(self, prompts):
        """Captions -> padded `input_ids` and `attention_mask` of `max_text_length`, on the model's device."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.config.max_text_length, return_tensors="pt"
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def make_noise(self, batch_size, generator=None):
        """Starting randomness for `batch_size` sprites, drawn on the generator's device, so a seed gives the same
        sprites on any device the model runs on."""
        return fresh_noise(self.generator.noise_shape(batch_size), generator, self.device)

    @torch.no_grad()
    def generate(
        self,
        prompts=None,
        input_ids=None,
        attention_mask=None,
        num_images_per_prompt=1,
        generator=None,
        guidance_scale=None,
        num_inference_steps=None,
        eta=None,
        flow_shift=None,
        epsilon_scaling=None,
        output_type="pt",
        progress_bar=True,
    ):
        """Sprites for `prompts` (strings) or for already tokenised `input_ids`.

        Returns a `(batch * num_images_per_prompt, num_channels, image_size, image_size)` tensor in [0, 1], or a list
        of PIL images (RGBA when the model has alpha) with `output_type="pil"`. Sprites of one prompt are adjacent.
        The same `generator` seed gives the same sprites. `guidance_scale`, `num_inference_steps`, `eta`,
        `flow_shift` (the flows only) and `epsilon_scaling` apply to the iterative generators (`uses_guidance`) and
        default to the config's; `progress_bar` shows a tqdm bar over their sampling steps.
        """
        if prompts is not None:
            input_ids, attention_mask = self.tokenize(prompts)
        if input_ids is None:
            raise ValueError("generate() needs `prompts` or `input_ids`")
        input_ids = input_ids.to(self.device).repeat_interleave(num_images_per_prompt, dim=0)
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device).repeat_interleave(num_images_per_prompt, dim=0))
        noise = self.make_noise(input_ids.shape[0], generator)
        was_training = self.training
        self.eval()  # dropout in the token transformer would make a seed give different sprites
        try:
            images = self(input_ids, attention_mask, noise=noise, generator=generator, guidance_scale=guidance_scale,
                          num_inference_steps=num_inference_steps, eta=eta, flow_shift=flow_shift,
                          epsilon_scaling=epsilon_scaling, progress_bar=progress_bar).images
        finally:
            self.train(was_training)
        images = ((images.float() + 1) / 2).clamp(0, 1)
        return images if output_type == "pt" else to_pil(images)


def to_pil(images):
    """(B, C, H, W) in [0, 1] -> PIL images, RGBA for four channels."""
    from PIL import Image

    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGBA" if a.shape[-1] == 4 else "RGB") for a in arrays]


# save_pretrained writes `auto_map` into config.json and copies both .py files next to the weights, so
# AutoModel.from_pretrained(..., trust_remote_code=True) can rebuild the model from the folder or the Hub alone
PokeSpriteConfig.register_for_auto_class()
PokeSpriteModel.register_for_auto_class("AutoModel")
# and in a process that imported this file, AutoConfig/AutoModel know "pokesprite" without trust_remote_code
AutoConfig.register(PokeSpriteConfig.model_type, PokeSpriteConfig, exist_ok=True)
AutoModel.register(PokeSpriteConfig, PokeSpriteModel, exist_ok=True)

__all__ = ["GENERATORS", "PokeSpriteModel", "PokeSpriteOutput"]

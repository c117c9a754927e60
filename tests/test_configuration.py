"""PokeSpriteConfig refuses values it cannot work with when it is built, in one line that names the field."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configuration_pokesprite import FLOAT_RANGES, INT_MINIMUMS, PokeSpriteConfig

LISTS = ("cross_attention_resolutions", "unet_channels", "unet_attention_resolutions", "autoencoder_channels", "flow_loss_pool_sizes")
FIELDS = [*INT_MINIMUMS, *FLOAT_RANGES, *LISTS, "generator_type", "model_name", "freeze_text_encoder", "unet_symmetric",
          "latent_flow_stage", "self_conditioning", "augment_conditioning"]
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-4, 64), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@pytest.mark.parametrize("field, value", [
    ("hidden_size", -32), ("max_text_length", -5), ("max_text_length", 0), ("image_size", "sixty-four"),
    ("noise_dim", 0), ("num_attention_heads", 2.5), ("num_inference_steps", True), ("text_dropout", 1.5), ("eta", math.nan),
    ("guidance_scale", -1.0), ("unet_channels", []), ("unet_channels", [32, "64"]), ("freeze_text_encoder", "yes"),
    ("unet_symmetric", 1), ("latent_channels", 0), ("autoencoder_channels", []), ("autoencoder_channels", [16, 0]),
    ("latent_flow_stage", None), ("latent_flow_stage", "vae"), ("input_perturbation", -0.1), ("input_perturbation", 2.0),
    ("unet_pixel_head_channels", -1), ("unet_pixel_head_channels", 1.5), ("augment_conditioning", "yes"),
])
def test_a_bad_value_is_refused_when_built_with_one_line_naming_the_field(field, value):
    with pytest.raises(ValueError) as error:
        PokeSpriteConfig(**{field: value})
    message = str(error.value)
    assert message.startswith(f"PokeSpriteConfig.{field} must be") and "\n" not in message


def test_from_pretrained_of_a_tampered_config_json_names_the_field(tmp_path):
    PokeSpriteConfig().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": -32}))
    with pytest.raises(ValueError, match=r"^PokeSpriteConfig\.hidden_size must be an integer >= 1, got -32$"):
        PokeSpriteConfig.from_pretrained(tmp_path)


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, min_size=1, max_size=3))
def test_any_values_build_or_fail_with_one_line_naming_a_field(values):
    try:
        config = PokeSpriteConfig(**values)
    except ValueError as error:
        message = str(error)
        assert "\n" not in message
        named = [name for name in FIELDS if name in message]
        assert named, message  # the field itself, or the one a shape rule names (e.g. num_attention_heads for hidden_size)
        return
    for name in INT_MINIMUMS:  # what builds is usable
        assert isinstance(getattr(config, name), int) and getattr(config, name) >= INT_MINIMUMS[name]


@pytest.mark.parametrize("generator_type, patch", [("flow", 1), ("diffusion", 1), ("latent-flow", 4)])
def test_a_pixel_head_where_no_patches_are_unfolded_is_refused_naming_the_field(generator_type, patch):
    with pytest.raises(ValueError, match=r"^PokeSpriteConfig\.unet_pixel_head_channels must be 0 for a "):
        PokeSpriteConfig(generator_type=generator_type, unet_patch_size=patch, unet_channels=[32, 64],
                         unet_pixel_head_channels=16, autoencoder_channels=[8, 16, 16])
    PokeSpriteConfig(generator_type="flow", unet_patch_size=4, unet_channels=[32, 64], unet_pixel_head_channels=16)



def test_augment_conditioning_on_the_decoder_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"^PokeSpriteConfig\.augment_conditioning is for the iterative generators"):
        PokeSpriteConfig(generator_type="decoder", augment_conditioning=True)
    for generator_type in ("diffusion", "flow"):
        assert PokeSpriteConfig(generator_type=generator_type, augment_conditioning=True).augment_conditioning

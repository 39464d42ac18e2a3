import dataclasses
import json

import pytest

from vargpt.config import (
    PRESETS,
    ConfigError,
    GenProjectorConfig,
    LLMConfig,
    SamplingConfig,
    TrainConfig,
    VARGPTConfig,
    VisionTowerConfig,
    VisualDecoderConfig,
    VQVAEConfig,
    sampling_config_from_dict,
    train_config_from_dict,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dict_and_json(name, tmp_path):
    cfg = VARGPTConfig.from_name(name)
    assert VARGPTConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert VARGPTConfig.from_json(path) == cfg
    assert VARGPTConfig.from_json(cfg.to_json()) == cfg
    json.loads(cfg.to_json())  # plain JSON


def test_configs_are_frozen_and_keyword_only():
    cfg = VARGPTConfig.from_name("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        VQVAEConfig(256)  # type: ignore[misc]


def test_released_model_sizes():
    cfg = VARGPTConfig.from_name("vargpt-v1-7b")
    assert cfg.vqvae.tokens_total == 680 and cfg.vqvae.latent_size == 16
    assert (cfg.vqvae.ch, cfg.vqvae.vocab_size, cfg.vqvae.z_channels) == (160, 4096, 32)
    assert (cfg.visual_decoder.depth, cfg.visual_decoder.width, cfg.visual_decoder.num_heads) == (30, 1920, 30)
    assert cfg.visual_decoder.mlp_hidden == 7680 and cfg.visual_decoder.head_dim == 64
    assert abs(cfg.visual_decoder.resolved_init_std - 0.013176) < 1e-6
    assert cfg.vision_tower.num_patches == 576 and cfg.vision_tower.hidden_size == 1024
    assert (cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.vocab_size) == (4096, 32, 32064)


@pytest.mark.parametrize(
    "build, field, value",
    [
        (lambda: VQVAEConfig(patch_nums=(1, 2, 8)), "patch_nums", "(1, 2, 8)"),
        (lambda: VQVAEConfig(image_size=250), "image_size", "250"),
        (lambda: VQVAEConfig(patch_nums=(1, 3, 2, 16)), "patch_nums", "(1, 3, 2, 16)"),
        (lambda: VisualDecoderConfig(width=100, num_heads=3), "width", "100"),
        (lambda: LLMConfig(num_kv_heads=5), "num_kv_heads", "5"),
        (lambda: LLMConfig(architecture="gpt9"), "architecture", "'gpt9'"),
        (lambda: SamplingConfig(top_p=1.5), "top_p", "1.5"),
        (lambda: SamplingConfig(cfg_schedule="cubic"), "cfg_schedule", "'cubic'"),
        (lambda: TrainConfig(lr=-1.0), "lr", "-1.0"),
        (lambda: TrainConfig(batch_size=0), "batch_size", "0"),
        (lambda: TrainConfig(replay_fraction=1.0), "replay_fraction", "1.0"),
        (lambda: TrainConfig(replay_power=-1.0), "replay_power", "-1.0"),
        (lambda: TrainConfig(image_min_scale_share=0.2), "image_min_scale_share", "0.2"),
        (lambda: TrainConfig(image_min_scale_share=-0.1), "image_min_scale_share", "-0.1"),
        (lambda: GenProjectorConfig(decoder_input="replace", input_gate=True), "input_gate", "True"),
    ],
)
def test_validation_names_field_and_value(build, field, value):
    with pytest.raises(ConfigError) as e:
        build()
    assert field in str(e.value) and value in str(e.value)


def test_unknown_keys_and_presets_are_rejected():
    d = VARGPTConfig.from_name("tiny").to_dict()
    d["vqvae"]["chanels"] = 3
    with pytest.raises(ConfigError, match="chanels"):
        VARGPTConfig.from_dict(d)
    with pytest.raises(ConfigError, match="unknown preset"):
        VARGPTConfig.from_name("huge")
    with pytest.raises(ConfigError, match="foo"):
        train_config_from_dict({"foo": 1})
    assert sampling_config_from_dict({"cfg": 3}).cfg == 3.0


def test_model_needs_room_for_images_in_context():
    tiny = VARGPTConfig.from_name("tiny")
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        dataclasses.replace(tiny, llm=dataclasses.replace(tiny.llm, max_position_embeddings=64))


@pytest.mark.parametrize(("change", "message"), [
    ({"patch_size": 4}, "total stride"),
    ({"hidden_size": 64}, "last stage size"),
    ({"stage_depths": (1,)}, "one depth per stage"),
    ({"drop_cls": False}, "no CLS token"),
    ({"feature_layer": -2}, "last stage's map"),
    ({"architecture": "vgg"}, '"clip" or "resnet"'),
])
def test_resnet_tower_config_errors_say_what_to_fix(change, message):
    base = dict(architecture="resnet", image_size=32, patch_size=8, hidden_size=128, stage_sizes=(64, 128),
                stage_depths=(1, 1), feature_layer=-1)
    with pytest.raises(ConfigError, match=message):
        VisionTowerConfig(**{**base, **change})
    assert VisionTowerConfig(**base).tokens_per_image == 16

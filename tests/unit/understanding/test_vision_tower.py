"""Vision tower features, the image processor, the projector, and the LLaVA composite."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vargpt.config import LLMConfig, VisionTowerConfig
from vargpt.llm.backbone import LLMBackbone
from vargpt.llm.merge import ImageCountMismatchError, expand_image_tokens
from vargpt.understanding.llava import Llava, to_hf_llava_state
from vargpt.understanding.projector import UnderstandingProjector
from vargpt.understanding.vision_tower import ImageProcessor, UnreadableImageError, VisionTower

VT = VisionTowerConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=3,
                       num_heads=4, projection_dim=16, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
LLM = LLMConfig(vocab_size=40, hidden_size=24, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                max_position_embeddings=64)
IMG = 39


def test_tower_features_are_penultimate_layer_without_cls():
    tower = VisionTower.from_config(VT).eval()
    x = torch.randn(2, 3, 16, 16)
    feats = tower(x)
    assert feats.shape == (2, 16, 32) and tower.num_patches == 16
    ref = tower.model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(feats, ref)


def test_tower_hf_config_round_trip():
    tower = VisionTower.from_config(VT)
    again = VisionTower.from_hf_config(tower.hf_config_dict())
    again.load_state_dict(tower.state_dict())
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(again.eval()(x), tower.eval()(x))


def test_processor_resizes_crops_and_normalises():
    proc = ImageProcessor.from_config(VT)
    white = Image.new("RGB", (32, 24), (255, 255, 255))
    x = proc([white, np.zeros((16, 16, 3), dtype=np.uint8)])
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.ones(3, 16, 16))
    torch.testing.assert_close(x[1], -torch.ones(3, 16, 16))
    assert proc(Image.new("L", (16, 16), 0)).shape == (1, 3, 16, 16)  # grey converted to RGB


def test_processor_unreadable_image_raises_named_error():
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    data = buf.getvalue()
    truncated = Image.open(io.BytesIO(data[: len(data) // 2]))  # opens lazily; decoding fails
    with pytest.raises(UnreadableImageError):
        ImageProcessor.from_config(VT)(truncated)
    with pytest.raises(UnreadableImageError):
        ImageProcessor.from_config(VT)(np.zeros((16, 16), dtype=np.float32))


def test_projector_is_linear_gelu_linear():
    proj = UnderstandingProjector(32, 24)
    x = torch.randn(2, 5, 32)
    ref = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(x)))
    torch.testing.assert_close(proj(x), ref)
    assert set(dict(proj.named_parameters())) == {"linear_1.weight", "linear_1.bias", "linear_2.weight",
                                                  "linear_2.bias"}


def _llava() -> Llava:
    torch.manual_seed(0)
    tower = VisionTower.from_config(VT)
    return Llava(tower, UnderstandingProjector(32, 24), LLMBackbone.from_config(LLM), image_token_id=IMG).eval()


def test_llava_places_image_embeddings_and_checks_counts():
    model = _llava()
    ids = torch.tensor([expand_image_tokens([1, 2, IMG, 3], IMG, 16)])
    pixels = torch.randn(1, 3, 16, 16)
    emb = model.input_embeds(ids, pixels_N3HW=pixels)
    torch.testing.assert_close(emb[0, 2:18], model.image_embeds(pixels)[0])
    torch.testing.assert_close(emb[0, :2], model.llm.embed(ids[:, :2])[0])
    feats = model.vision_tower(pixels)
    torch.testing.assert_close(model(ids, image_feats_NPF=feats).logits_BTV, model(ids, pixels_N3HW=pixels).logits_BTV)
    with pytest.raises(ImageCountMismatchError):
        model(ids)
    with pytest.raises(ImageCountMismatchError):
        model(ids, pixels_N3HW=torch.randn(2, 3, 16, 16))


def test_llava_state_maps_to_hf_llava_names():
    keys = to_hf_llava_state(_llava().state_dict())
    assert "model.multi_modal_projector.linear_1.weight" in keys and "lm_head.weight" in keys
    assert any(k.startswith("model.vision_tower.encoder.layers.0.") for k in keys)
    assert any(k.startswith("model.language_model.layers.0.") for k in keys)


RESNET = VisionTowerConfig(architecture="resnet", image_size=32, patch_size=8, hidden_size=24, stem_size=8,
                           stage_sizes=(16, 24), stage_depths=(1, 1), feature_layer=-1, projection_dim=16)


def test_resnet_tower_features_are_the_last_map_cells_row_major():
    tower = VisionTower.from_config(RESNET).eval()
    x = torch.randn(2, 3, 32, 32)
    feats, pooled = tower.features_and_pooled(x)
    assert feats.shape == (2, 16, 24) and tower.num_patches == 16 == RESNET.tokens_per_image
    assert tower.hidden_size == 24
    grid = tower.model(pixel_values=x).last_hidden_state  # (B, C, 4, 4)
    assert grid.shape == (2, 24, 4, 4)
    torch.testing.assert_close(feats[:, 4 * 1 + 2], grid[:, :, 1, 2])  # row 1, column 2
    torch.testing.assert_close(pooled, grid.mean((2, 3)))
    torch.testing.assert_close(tower(x), feats)


def test_resnet_tower_config_round_trip_keeps_image_size():
    tower = VisionTower.from_config(RESNET)
    again = VisionTower.from_hf_config(tower.hf_config_dict())
    assert again.num_patches == 16
    again.load_state_dict(tower.state_dict())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), tower.eval()(x))


def test_unknown_tower_model_type_is_a_named_error():
    with pytest.raises(ValueError, match="unsupported vision tower model_type 'dinov2'"):
        VisionTower.from_hf_config({"model_type": "dinov2"})


def test_resnet_llava_cannot_become_hf_llava_but_a_vit_stand_in_matches_its_shape():
    from vargpt.understanding.llava import vit_stand_in

    torch.manual_seed(0)
    model = Llava(VisionTower.from_config(RESNET), UnderstandingProjector(24, 24), LLMBackbone.from_config(LLM),
                  image_token_id=IMG)
    with pytest.raises(ValueError, match="ViT towers only"):
        to_hf_llava_state(model.state_dict())
    vit, vit_cfg = vit_stand_in(RESNET)
    assert vit_cfg.architecture == "clip" and vit.num_patches == 16 and vit.hidden_size == 24
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 16, 24)
    keys = to_hf_llava_state(Llava(vit, model.projector, model.llm, image_token_id=IMG).state_dict())
    assert any(k.startswith("model.vision_tower.encoder.layers.1.") for k in keys)

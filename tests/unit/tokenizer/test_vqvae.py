"""MultiScaleVQVAE: the released ``vae_local.*`` key layout (SPEC section 4), round trips, save/load."""

from __future__ import annotations

import pytest
import torch

from vargpt.config import VARGPTConfig, VQVAEConfig
from vargpt.tokenizer.autoencoder import AttnBlock, Decoder, Downsample, Encoder, num_groups
from vargpt.tokenizer.vqvae import MultiScaleVQVAE, vqvae_config_from_dict


def spec_vae_local_shapes(ch=160, mult=(1, 1, 2, 2, 4), nrb=2, z=32, V=4096, S=10, n_phi=4, attn=True):
    """The key -> shape table of SPEC section 4 ``vae_local.*``, written from the spec's prose.

    Defaults are the released sizes; the arguments generalise the same prose to tiny sizes.
    """
    t: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k):
        t[f"{name}.weight"], t[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        t[f"{name}.weight"], t[f"{name}.bias"] = (c,), (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def att(name, c):
        norm(f"{name}.norm", c)
        conv(f"{name}.qkv", 3 * c, c, 1)
        conv(f"{name}.proj_out", c, c, 1)

    def mid(name, c):
        res(f"{name}.block_1", c, c)
        if attn:
            att(f"{name}.attn_1", c)
        res(f"{name}.block_2", c, c)

    n, top = len(mult), ch * mult[-1]
    # encoder: conv_in, levels with nrb blocks (attention after each at the last level), downsample
    conv("encoder.conv_in", ch, 3, 3)
    c = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            res(f"encoder.down.{i}.block.{j}", c, ch * m)
            c = ch * m
            if attn and i == n - 1:
                att(f"encoder.down.{i}.attn.{j}", c)
        if i < n - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder.mid", top)
    norm("encoder.norm_out", top)
    conv("encoder.conv_out", z, top, 3)
    # decoder: conv_in, mid, up levels (index = level) with nrb+1 blocks, upsample on levels >= 1
    conv("decoder.conv_in", top, z, 3)
    mid("decoder.mid", top)
    c = top
    for i in reversed(range(n)):
        for j in range(nrb + 1):
            res(f"decoder.up.{i}.block.{j}", c, ch * mult[i])
            c = ch * mult[i]
            if attn and i == n - 1:
                att(f"decoder.up.{i}.attn.{j}", c)
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", ch)
    conv("decoder.conv_out", 3, ch, 3)
    # quantizer and the two 32->32 convs
    t["quantize.embedding.weight"] = (V, z)
    for j in range(n_phi):
        conv(f"quantize.quant_resi.qresi_ls.{j}", z, z, 3)
    t["quantize.ema_vocab_hit_SV"] = (S, V)
    conv("quant_conv", z, z, 3)
    conv("post_quant_conv", z, z, 3)
    return t


def test_spec_table_literal_entries():
    # Entries copied verbatim from SPEC section 4, as a check on the table builder itself.
    t = spec_vae_local_shapes()
    assert len(t) == 324
    assert t["encoder.conv_in.weight"] == (160, 3, 3, 3)
    assert t["encoder.down.2.block.0.conv1.weight"] == (320, 160, 3, 3)
    assert t["encoder.down.2.block.0.nin_shortcut.weight"] == (320, 160, 1, 1)
    assert t["encoder.down.4.block.0.nin_shortcut.weight"] == (640, 320, 1, 1)
    assert t["encoder.down.3.downsample.conv.weight"] == (320, 320, 3, 3)
    assert t["encoder.down.4.attn.1.qkv.weight"] == (1920, 640, 1, 1)
    assert t["encoder.conv_out.weight"] == (32, 640, 3, 3)
    assert t["decoder.conv_in.weight"] == (640, 32, 3, 3)
    assert t["decoder.up.1.block.0.nin_shortcut.weight"] == (160, 320, 1, 1)
    assert t["decoder.up.3.block.0.nin_shortcut.weight"] == (320, 640, 1, 1)
    assert "decoder.up.4.attn.2.proj_out.weight" in t
    assert t["decoder.up.1.upsample.conv.weight"] == (160, 160, 3, 3)
    assert t["decoder.up.4.upsample.conv.weight"] == (640, 640, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in t
    assert t["quantize.ema_vocab_hit_SV"] == (10, 4096)


def _load_strict(model, table, device):
    state = {k: torch.zeros(v, device=device) for k, v in table.items()}
    result = model.load_state_dict(state, strict=True, assign=device == "meta")
    assert not result.missing_keys and not result.unexpected_keys


def test_default_sizes_match_released_layout_on_meta():
    with torch.device("meta"):
        model = MultiScaleVQVAE(VQVAEConfig())
    table = spec_vae_local_shapes()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == table
    _load_strict(model, table, "meta")
    enc = sum(p.numel() for p in model.encoder.parameters())
    dec = sum(p.numel() for p in model.decoder.parameters())
    assert round(enc / 1e6, 2) == 44.11 and round(dec / 1e6, 2) == 64.65  # SPEC 1.1


@pytest.mark.parametrize(
    "cfg",
    [
        VQVAEConfig(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, use_attn=False,
                    z_channels=16, vocab_size=256, patch_nums=(1, 2, 3, 4, 6, 8)),
        VQVAEConfig(image_size=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, use_attn=True,
                    z_channels=8, vocab_size=64, share_quant_resi=0, patch_nums=(1, 2, 4)),
    ],
)
def test_tiny_sizes_match_layout(cfg):
    model = MultiScaleVQVAE(cfg)
    n_phi = cfg.num_scales if cfg.share_quant_resi == 0 else cfg.share_quant_resi
    table = spec_vae_local_shapes(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.vocab_size,
                                  cfg.num_scales, n_phi, cfg.use_attn)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == table
    _load_strict(model, table, "cpu")


def test_encode_decode_round_trip_tiny():
    cfg = VARGPTConfig.from_name("tiny").vqvae
    model = MultiScaleVQVAE(cfg).eval()
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    idx_list = model.encode(x)
    assert [tuple(i.shape) for i in idx_list] == [(2, pn * pn) for pn in cfg.patch_nums]
    y = model.decode(idx_list)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    f_hat = model.quantize.idx_to_fhat(idx_list)
    assert torch.equal(model.decode(f_hat), y)
    assert torch.equal(model.reconstruct(x), y)
    recon, hits_SV, vq_loss = model(x)
    assert recon.shape == x.shape and hits_SV.shape == (cfg.num_scales, cfg.vocab_size) and vq_loss.ndim == 0


def test_attention_matches_explicit_formula():
    torch.manual_seed(0)
    blk = AttnBlock(32)
    x = torch.randn(2, 32, 4, 4)
    y = blk.norm(x)
    qkv = blk.qkv(y).flatten(2)  # B, 3C, N
    q, k, v = qkv[:, :32], qkv[:, 32:64], qkv[:, 64:]
    a = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 32 ** 0.5, dim=-1)
    h = torch.einsum("bij,bcj->bci", a, v).reshape(2, 32, 4, 4)
    torch.testing.assert_close(blk(x), x + blk.proj_out(h), rtol=1e-5, atol=1e-5)


def test_downsample_pads_right_bottom_only():
    d = Downsample(1)
    torch.nn.init.zeros_(d.conv.weight)
    torch.nn.init.zeros_(d.conv.bias)
    d.conv.weight.data[0, 0, 0, 0] = 1.0  # picks the top-left tap of each 3x3 window
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert d(x).squeeze().tolist() == [[0.0, 2.0], [8.0, 10.0]]


def test_save_and_from_pretrained(tmp_path):
    cfg = VARGPTConfig.from_name("tiny").vqvae
    model = MultiScaleVQVAE(cfg)
    out = model.save_pretrained(tmp_path / "vq")
    loaded = MultiScaleVQVAE.from_pretrained(out)
    assert loaded.cfg == cfg and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert vqvae_config_from_dict({"vqvae": {"patch_nums": [1, 2], "image_size": 8, "ch_mult": [1, 1, 2]}}) \
        .patch_nums == (1, 2)
    with pytest.raises(ValueError, match="unknown"):
        vqvae_config_from_dict({"bogus": 1})


def test_group_counts():
    assert [num_groups(c) for c in (160, 320, 640)] == [32, 32, 32]  # VAR's widths keep 32 groups
    assert [num_groups(c) for c in (16, 32, 48, 64)] == [4, 8, 12, 16]  # >= 4 channels per group


def test_norm_groups_zero_removes_norms():
    enc = Encoder(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, use_attn=True, norm_groups=0)
    dec = Decoder(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, use_attn=True, norm_groups=0)
    assert not any("norm" in k for k in list(enc.state_dict()) + list(dec.state_dict()))
    z = enc(torch.randn(2, 3, 8, 8))
    assert z.shape == (2, 8, 4, 4) and dec(z).shape == (2, 3, 8, 8)


def test_config_norm_groups_reaches_the_model():
    cfg = VQVAEConfig(image_size=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, use_attn=False, z_channels=8,
                      vocab_size=16, patch_nums=(1, 2, 4, 8), norm_groups=0)
    vae = MultiScaleVQVAE(cfg)
    assert not any("norm" in k for k in vae.state_dict())
    assert vqvae_config_from_dict({**cfg.__dict__}).norm_groups == 0
    assert VQVAEConfig().norm_groups == 32  # VAR's GroupNorm(32) by default (released weights)
    with pytest.raises(ValueError, match="norm_groups"):
        VQVAEConfig(norm_groups=-1)

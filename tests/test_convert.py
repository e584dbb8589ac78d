"""Weight import: each published key/shape layout (written here at tiny sizes) loads and computes the same."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from models.convert import checkpoint_model_options, detect_format, load_pretrained, sincos_1d_table
from models.mae import MaskedAutoencoderViT
from models.video_vit import resize_spatial_pos_embed, resize_temporal_pos_embed, separable_pos_table
from models.vit import VisionTransformer
from util.weights import read_weights

DEC = dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2)
SMALL = dict(img_size=32, num_frames=4, depth=2, embed_dim=32, num_heads=2)


def mae(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("mae_vit_micro_patch8", **{**SMALL, **DEC, **kw}).eval()


def vit(seed: int = 1, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("vit_micro_patch8", **{**SMALL, "num_classes": 5, "dropout": 0.0, **kw}).eval()


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values everywhere (zero-initialised biases would hide a mis-mapped bias)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def perturb(model: torch.nn.Module, seed: int = 11) -> torch.nn.Module:
    """N(0, 0.02) added to every parameter, as the import check in issue 16 measured (norms stay near 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference b."""
    return float((a - b).abs().max() / b.abs().max())


def split_qkv(sd: dict, prefix: str = "") -> dict:
    """Our fused `attn.qkv` -> official MAE-ST separate `attn.q/k/v` linears."""
    out = {}
    for k, v in sd.items():
        if ".attn.qkv." in k:
            for name, part in zip("qkv", v.chunk(3), strict=True):
                out[prefix + k.replace(".qkv.", f".{name}.")] = part.clone()
        else:
            out[prefix + k] = v.clone()
    return out


def to_videomae(sd: dict, encoder_prefix: str) -> dict:
    """Our keys -> VideoMAE: fused qkv weight, q_bias/v_bias, no stored position table."""
    out = {}
    for k, v in sd.items():
        if "pos_embed" in k:
            continue
        if k.endswith("attn.qkv.bias"):
            q, kb, vb = v.chunk(3)
            assert torch.all(kb == 0), "VideoMAE has no key bias"
            out[encoder_prefix + k.replace("qkv.bias", "q_bias")] = q.clone()
            out[encoder_prefix + k.replace("qkv.bias", "v_bias")] = vb.clone()
        else:
            out[encoder_prefix + k] = v.clone()
    return out


def reference_attention(x: torch.Tensor, sd: dict, pre: str, heads: int) -> torch.Tensor:
    """Textbook attention from separate q/k/v linears (or q_bias/v_bias with a bias-free key)."""
    B, N, D = x.shape

    def lin(name: str) -> torch.Tensor:
        if pre + f"{name}.weight" in sd:
            return F.linear(x, sd[pre + f"{name}.weight"], sd.get(pre + f"{name}.bias"))
        w = sd[pre + "qkv.weight"].chunk(3)["qkv".index(name)]
        if pre + "qkv.bias" in sd:  # PySlowFast: one fused qkv linear with a full bias
            return F.linear(x, w, sd[pre + "qkv.bias"].chunk(3)["qkv".index(name)])
        bias = {"q": sd[pre + "q_bias"], "k": None, "v": sd[pre + "v_bias"]}[name]
        return F.linear(x, w, bias)

    q, k, v = (lin(n).view(B, N, heads, D // heads).transpose(1, 2) for n in "qkv")
    attn = (q @ k.transpose(-2, -1) / (D // heads) ** 0.5).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, D)
    return F.linear(out, sd[pre + "proj.weight"], sd[pre + "proj.bias"])


def layer_norm(x: torch.Tensor, sd: dict, pre: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[pre + "weight"], sd[pre + "bias"], eps=1e-6)


def reference_block(x: torch.Tensor, sd: dict, pre: str, heads: int) -> torch.Tensor:
    """Pre-norm block from its formulas; with layer scale x + gamma_1 * attn(...), x + gamma_2 * mlp(...)."""
    g1, g2 = sd.get(pre + "gamma_1", 1.0), sd.get(pre + "gamma_2", 1.0)
    x = x + g1 * reference_attention(layer_norm(x, sd, pre + "norm1."), sd, pre + "attn.", heads)
    hidden = F.gelu(F.linear(layer_norm(x, sd, pre + "norm2."), sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]))
    return x + g2 * F.linear(hidden, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])


def reference_tokens(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Tubelet embedding as a strided Conv3d, tokens in (t, h, w) order: [B, L, D]."""
    return F.conv3d(x, weight, bias, stride=weight.shape[2:]).flatten(2).transpose(1, 2)


def reference_sincos(n: int, dim: int) -> torch.Tensor:
    """VideoMAE's published table: angle pos / 10000^(2 * (j // 2) / dim), sin on even j, cos on odd j."""
    table = torch.tensor([[pos / 10000 ** (2 * (j // 2) / dim) for j in range(dim)] for pos in range(n)],
                         dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = table[:, 0::2].sin(), table[:, 1::2].cos()
    return table.float()


def clips(frames: int = 4, size: int = 32, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, frames, size, size, generator=torch.Generator().manual_seed(3))


def test_official_mae_st_release_loads_whole_into_mae_and_encoder_into_vit(tmp_path: Path) -> None:
    src = randomize(mae())
    official = split_qkv(src.state_dict())
    assert "blocks.0.attn.q.weight" in official and "pos_embed_class" in official
    assert official["patch_embed.proj.weight"].shape == (32, 3, 2, 8, 8)
    torch.save({"model": official}, tmp_path / "mae_pretrain_vit_tiny_k400.pth")
    assert detect_format(official) == "mae_st"

    dst = mae(seed=5)
    report = load_pretrained(dst, read_weights(tmp_path / "mae_pretrain_vit_tiny_k400.pth"))
    assert report.source_format == "mae_st" and not report.missing and not report.unexpected
    x, noise = clips(), torch.rand(2, 2 * 4 * 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for a, b in zip(src(x, 0.75, noise), dst(x, 0.75, noise), strict=True):
            torch.testing.assert_close(a, b)
        tokens = torch.randn(2, 7, 32)
        expected = reference_attention(tokens, official, "blocks.1.attn.", heads=2)
        torch.testing.assert_close(dst.blocks[1].attn(tokens), expected, rtol=1e-5, atol=1e-5)

    classifier = vit(cls_embed=True)  # the checkpoint's class token takes part in attention
    report = load_pretrained(classifier, official)
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert not report.missing_encoder and len(report.dropped) > 0
    torch.testing.assert_close(classifier.fc_norm.weight, src.norm.weight)  # pooled norm = encoder norm
    with torch.no_grad():
        torch.testing.assert_close(classifier.blocks[0].attn(tokens),
                                   reference_attention(tokens, official, "blocks.0.attn.", heads=2))


@pytest.mark.parametrize("layout", ["pretrain", "finetuned"])
def test_videomae_qbias_vbias_and_regenerated_sincos_table(layout: str) -> None:
    kw = dict(sep_pos_embed=False, cls_embed=False)
    src = randomize(vit(**kw))
    with torch.no_grad():
        for blk in src.blocks:
            blk.attn.qkv.bias[32:64] = 0  # VideoMAE's key projection has no bias
        src.pos_embed.copy_(sincos_1d_table(2 * 4 * 4, 32))
    sd = src.state_dict()
    if layout == "pretrain":  # encoder./decoder. prefixes, final `norm`, no head
        sd = {("norm." + k[8:] if k.startswith("fc_norm.") else k): v for k, v in sd.items() if "head" not in k}
        ckpt = {"model": {**to_videomae(sd, "encoder."), "decoder.norm.weight": torch.ones(16),
                          "encoder_to_decoder.weight": torch.randn(16, 32), "mask_token": torch.zeros(1, 1, 16)}}
    else:
        ckpt = {"module": to_videomae(sd, "")}
    dst = vit(**kw, seed=7)
    report = load_pretrained(dst, ckpt.get("model", ckpt.get("module")))
    assert report.source_format == "videomae" and not report.unexpected
    assert not report.missing_encoder and any("sin-cos" in n for n in report.notes)
    torch.testing.assert_close(dst.pos_embed, src.pos_embed)
    x, tokens = clips(), torch.randn(2, 7, 32)
    raw = ckpt.get("model", ckpt.get("module"))
    pre = "encoder.blocks.0.attn." if layout == "pretrain" else "blocks.0.attn."
    with torch.no_grad():
        if layout == "pretrain":  # VideoMAE's fine-tuning drops the pretraining `norm`: fc_norm starts at identity
            src.fc_norm.reset_parameters()
        torch.testing.assert_close(dst.blocks[0].attn(tokens), reference_attention(tokens, raw, pre, heads=2))
        torch.testing.assert_close(dst.forward_features(x), src.forward_features(x))


def test_our_export_with_wrapper_prefixes_and_containers(tmp_path: Path) -> None:
    src = randomize(vit())
    wrapped = {f"module._orig_mod.{k}".replace("blocks.0.", "blocks.0._checkpoint_wrapped_module."): v
               for k, v in src.state_dict().items()}
    torch.save({"model": wrapped}, tmp_path / "w.pth")
    dst = vit(seed=9)
    report = load_pretrained(dst, read_weights(tmp_path / "w.pth"))
    assert report.source_format == "ours" and not report.missing and not report.unexpected
    for key in ("model_state", "module", "state_dict"):  # the containers of PySlowFast, VideoMAE, others
        torch.save({key: wrapped, "epoch": 3}, tmp_path / "c.pth")
        assert read_weights(tmp_path / "c.pth").keys() == src.state_dict().keys()
    torch.save(torch.zeros(3), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="holds a Tensor, not a dict of weights"):
        read_weights(tmp_path / "bare.pth")
    x = clips()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_head_of_other_size_skipped_and_missing_encoder_keys_refused(caplog: pytest.LogCaptureFixture) -> None:
    sd = randomize(vit(num_classes=400)).state_dict()
    with caplog.at_level(logging.INFO):
        report = load_pretrained(vit(), sd)
    assert [s.split()[0] for s in report.skipped] == ["head.weight", "head.bias"]
    assert "skipped for shape" in caplog.text and "head.weight" in caplog.text
    del sd["blocks.1.mlp.fc1.weight"]
    with pytest.raises(ValueError, match="blocks.1.mlp.fc1.weight"):
        load_pretrained(vit(), sd)
    report = load_pretrained(vit(), sd, strict_encoder=False)
    assert report.missing_encoder == ["blocks.1.mlp.fc1.weight"]


@pytest.mark.parametrize("sep", [True, False])
def test_interpolate_8_to_16_frames_and_112_to_224_px(sep: bool) -> None:
    big = dict(patch_size=16, embed_dim=32, num_heads=2, depth=1, sep_pos_embed=sep)
    torch.manual_seed(0)
    src = randomize(MaskedAutoencoderViT.from_kwargs(img_size=112, num_frames=8, **big, **DEC))
    dst = VisionTransformer(img_size=224, num_frames=16, num_classes=3, cls_embed=True, **big).eval()
    report = load_pretrained(dst, src.state_dict())
    assert not report.missing_encoder and not report.skipped and report.notes
    if sep:
        torch.testing.assert_close(dst.pos_embed_spatial, resize_spatial_pos_embed(src.pos_embed_spatial, (14, 14)))
        torch.testing.assert_close(dst.pos_embed_temporal, resize_temporal_pos_embed(src.pos_embed_temporal, 8))
    else:
        assert dst.pos_embed.shape == (1, 1 + 8 * 14 * 14, 32)
        torch.testing.assert_close(dst.pos_embed[:, :1], src.pos_embed[:, :1])  # class position kept
    with torch.no_grad():
        out = dst(clips(frames=16, size=224, b=1))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_joint_checkpoint_into_separable_model_and_back() -> None:
    src = randomize(mae(sep_pos_embed=False))
    sep = vit(cls_embed=True)
    report = load_pretrained(sep, src.state_dict())
    assert not report.missing_encoder and any("least squares" in n for n in report.notes)
    joint = vit(sep_pos_embed=False, cls_embed=True)
    load_pretrained(joint, sep.state_dict())
    expected = torch.cat([sep.pos_embed_class, separable_pos_table(sep.pos_embed_spatial, sep.pos_embed_temporal)], 1)
    torch.testing.assert_close(joint.pos_embed, expected)


# ----------------------------------------------------------------------------- PySlowFast MAE (issue 16, item 11)
# Tiny sizes in PySlowFast's layout; its decoder heads are decoder_embed_dim // 64, so the decoder is 128-d.
PYSF = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=128,
            decoder_depth=2)


def to_pyslowfast(sd: dict, split: bool) -> dict:
    """Our MAE keys -> a MaskMViT .pyth: decoder blocks then its norm under pred_head.transforms.0, pixel head
    under pred_head.projections.0, separable decoder tables as dec_pos_embed_*; `split`: q/k/v linears as
    in the released mae_pretrain_vit_*.pth files."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks."))
    out = {}
    for k, v in (split_qkv(sd) if split else sd).items():
        k = re.sub(r"^decoder_blocks\.", "pred_head.transforms.0.", k)
        k = re.sub(r"^decoder_norm\.", f"pred_head.transforms.0.{depth}.", k)
        k = re.sub(r"^decoder_pred\.", "pred_head.projections.0.", k)
        out[re.sub(r"^decoder_pos_embed_", "dec_pos_embed_", k)] = v.clone()
    return out


def pyslowfast_checkpoint(sep_decoder: bool = False, split: bool = False) -> dict:
    """A PySlowFast MAE checkpoint: no learned decoder class token, joint (or dec_) decoder table, random weights."""
    torch.manual_seed(0)
    src = perturb(MaskedAutoencoderViT.from_kwargs(**PYSF, decoder_num_heads=128 // 64, decoder_cls="encoder",
                                       decoder_sep_pos_embed=sep_decoder))
    pyth = to_pyslowfast(src.state_dict(), split)
    assert not any("cls_token" in k for k in pyth if k.startswith(("decoder", "pred_head")))
    return pyth


def separable(spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
    """[1, T*HW, D]: spatial row s plus temporal row t at token t * HW + s."""
    return (temporal[:, :, None] + spatial[:, None]).flatten(1, 2)


def reference_pyslowfast_encoder(sd: dict, x: torch.Tensor, keep: torch.Tensor, heads: int) -> torch.Tensor:
    """MaskMViT's MAE encoder: visible tokens + separable positions, class token first, blocks, norm."""
    tokens = reference_tokens(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"])
    tokens = tokens + separable(sd["pos_embed_spatial"], sd["pos_embed_temporal"])
    visible = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
    h = torch.cat([(sd["cls_token"] + sd["pos_embed_class"]).expand(len(x), -1, -1), visible], 1)
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        h = reference_block(h, sd, f"blocks.{i}.", heads)
    return layer_norm(h, sd, "norm.")


def reference_pyslowfast_mae(sd: dict, x: torch.Tensor, noise: torch.Tensor, ratio: float, heads: int) -> torch.Tensor:
    """PySlowFast's MAE: predictions [B, L, P] for every token (`return_all`), from its published structure.

    The decoder's class token is decoder_embed of the encoder's class-token output; the decoder has
    decoder_embed_dim // 64 heads and one joint position table (or dec_pos_embed_* when separable).
    """
    L = noise.shape[1]
    keep = noise.argsort(1)[:, : int(L * (1 - ratio))]
    y = F.linear(reference_pyslowfast_encoder(sd, x, keep, heads), sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    dim = y.shape[-1]
    patches = sd["mask_token"].expand(len(x), L, dim).clone()
    patches.scatter_(1, keep[..., None].expand(-1, -1, dim), y[:, 1:])  # visible tokens back at their positions
    if "decoder_pos_embed" in sd:
        table = sd["decoder_pos_embed"]
    else:
        table = torch.cat([sd["dec_pos_embed_class"], separable(sd["dec_pos_embed_spatial"], sd["dec_pos_embed_temporal"])], 1)
    y = torch.cat([y[:, :1], patches], 1) + table
    depth = len({k.split(".")[3] for k in sd if k.startswith("pred_head.transforms.0.") and ".norm1." in k})
    for i in range(depth):
        y = reference_block(y, sd, f"pred_head.transforms.0.{i}.", dim // 64)
    y = layer_norm(y, sd, f"pred_head.transforms.0.{depth}.")
    return F.linear(y[:, 1:], sd["pred_head.projections.0.weight"], sd["pred_head.projections.0.bias"])


@pytest.mark.parametrize("decoder_table,attn", [("joint", "fused qkv"), ("separable", "q/k/v")])
def test_pyslowfast_mae_imports_exactly_into_a_model_built_its_way(decoder_table: str, attn: str, tmp_path: Path) -> None:
    pyth = pyslowfast_checkpoint(sep_decoder=decoder_table == "separable", split=attn == "q/k/v")
    torch.save({"model_state": pyth, "epoch": 400}, tmp_path / "k400.pyth")
    sd = read_weights(tmp_path / "k400.pyth")
    options = checkpoint_model_options(sd)
    assert options["decoder_cls"] == "encoder" and options["decoder_num_heads"] == 2  # 128 // 64
    assert options["decoder_sep_pos_embed"] is (decoder_table == "separable") and options["target_frames"] == "stride"
    torch.manual_seed(5)
    model = MaskedAutoencoderViT.from_kwargs(**{**PYSF, **options}).eval()
    report = load_pretrained(model, sd)
    assert report.source_format == "pyslowfast" and not report.missing and not report.unexpected
    assert any("decoder_embed_dim // 64" in n for n in report.notes)  # heads: the format's, and said so
    x, noise = clips(), torch.rand(2, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        pred = model(x, 0.75, noise)[1]
        expected = reference_pyslowfast_mae(sd, x, noise, 0.75, heads=2)
    assert rel_diff(pred, expected) < 1e-5, rel_diff(pred, expected)  # fp32: ~1e-7 measured


def test_pyslowfast_decoder_into_a_decoder_built_otherwise_is_refused_or_left_out_on_request() -> None:
    sd = pyslowfast_checkpoint()
    torch.manual_seed(5)
    ours = MaskedAutoencoderViT.from_kwargs(**PYSF, decoder_num_heads=4).eval()  # learned class token, separable table
    with pytest.raises(ValueError) as refused:
        load_pretrained(ours, sd, source="k400.pyth")
    for words in ("k400.pyth", "decoder_cls", "decoder_num_heads", "decoder_embed_dim // 64 = 2", "decoder_sep_pos_embed",
                  "decoder_cls='encoder'", "load_decoder=False", "Fine-tuning is unaffected"):
        assert words in str(refused.value), words
    decoder_before = {k: v.clone() for k, v in ours.state_dict().items() if k.startswith(("decoder_", "mask_token"))}
    report = load_pretrained(ours, sd, load_decoder=False)
    assert report.dropped and all(k.startswith(("decoder_", "mask_token")) for k in report.dropped)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in decoder_before.items())  # its own decoder kept
    x, noise = clips(), torch.rand(2, 32, generator=torch.Generator().manual_seed(4))
    keep = noise.argsort(1)[:, :8]
    with torch.no_grad():
        latent = ours.forward_encoder(x, 0.75, noise)[0]
        assert rel_diff(latent, reference_pyslowfast_encoder(sd, x, keep, heads=2)) < 1e-5  # encoder exact

    # Fine-tuning: the classifier takes the encoder (decoder dropped), also from a fine-tuned .pyth's head.
    head = {"head.projection.weight": torch.randn(5, 32), "head.projection.bias": torch.randn(5)}
    classifier = vit(cls_embed=True)
    report = load_pretrained(classifier, {**sd, **head})
    assert not report.missing and torch.equal(classifier.head.weight, head["head.projection.weight"])
    assert "decoder_embed.weight" in report.dropped and "decoder_pos_embed" in report.dropped


# ----------------------------------------------------------------------------- layer scale (issue 16, item 10)
def reference_videomae_classifier(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """VideoMAE's fine-tuned ViT: tubelets + fixed sin-cos, blocks with layer scale, fc_norm(mean), head."""
    tokens = reference_tokens(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"])
    h = tokens + reference_sincos(tokens.shape[1], tokens.shape[2])
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        h = reference_block(h, sd, f"blocks.{i}.", heads)
    return F.linear(layer_norm(h.mean(1), sd, "fc_norm."), sd["head.weight"], sd["head.bias"])


def videomae_layer_scale_checkpoint() -> dict:
    """A fine-tuned VideoMAE checkpoint with init_values > 0: blocks.N.gamma_1/gamma_2, q_bias/v_bias."""
    src = perturb(vit(sep_pos_embed=False, cls_embed=False, init_values=0.1))
    with torch.no_grad():
        for blk in src.blocks:
            blk.attn.qkv.bias[32:64] = 0  # VideoMAE's key projection has no bias
    ckpt = to_videomae(src.state_dict(), "")
    assert "blocks.1.gamma_2" in ckpt and "blocks.0.attn.q_bias" in ckpt
    return ckpt


def test_videomae_layer_scale_loads_exactly_into_init_values_blocks() -> None:
    ckpt = videomae_layer_scale_checkpoint()
    assert checkpoint_model_options(ckpt)["init_values"] > 0
    model = vit(sep_pos_embed=False, cls_embed=False, init_values=0.1, seed=7)
    report = load_pretrained(model, ckpt)
    assert not report.missing and not report.unexpected and not report.initialised
    x = clips()
    with torch.no_grad():
        assert rel_diff(model(x), reference_videomae_classifier(ckpt, x, heads=2)) < 1e-5


def test_unexpected_encoder_weights_are_an_error_unless_accepted(caplog: pytest.LogCaptureFixture) -> None:
    ckpt = videomae_layer_scale_checkpoint()
    plain = vit(sep_pos_embed=False, cls_embed=False)
    with pytest.raises(ValueError) as refused:
        load_pretrained(plain, ckpt, source="videomae_ls.pth")
    for words in ("videomae_ls.pth", "blocks.0.gamma_1", "blocks.1.gamma_2", "init_values", "allow_unexpected=True"):
        assert words in str(refused.value), words
    with caplog.at_level(logging.INFO):
        report = load_pretrained(plain, ckpt, allow_unexpected=True)
    assert sorted(report.unexpected) == sorted(k for k in ckpt if "gamma" in k)
    assert any(r.levelno == logging.WARNING and "blocks.0.gamma_1" in r.getMessage() for r in caplog.records)
    x = clips()
    with torch.no_grad():  # what the silent drop did before: another function (0.49 relative in the issue)
        assert rel_diff(plain(x), reference_videomae_classifier(ckpt, x, heads=2)) > 0.05

    # Any encoder weight counts, not only gammas: a class token a model without one would drop.
    with pytest.raises(ValueError, match=r"cls_token.*cls_embed=True.*allow_unexpected"):
        load_pretrained(vit(), randomize(mae()).state_dict())


def test_checkpoint_without_layer_scale_into_layer_scale_blocks_keeps_init_values() -> None:
    sd = randomize(vit(cls_embed=True)).state_dict()
    model = vit(cls_embed=True, init_values=0.1, seed=3)
    report = load_pretrained(model, sd)
    assert sorted(report.initialised) == sorted(f"blocks.{i}.gamma_{j}" for i in range(2) for j in (1, 2))
    assert not report.missing and torch.equal(model.blocks[0].gamma_1, torch.full((32,), 0.1))
    # A decoder is only taken as it was: gammas the checkpoint's decoder never had make it inexact.
    sd = randomize(mae()).state_dict()
    with pytest.raises(ValueError, match=r"decoder_blocks\.0\.gamma_1.*decoder_init_values=0\.0"):
        load_pretrained(mae(init_values=0.1), sd)
    report = load_pretrained(mae(init_values=0.1, decoder_init_values=0.0), sd)
    assert len(report.initialised) == 4 and not report.missing


def to_videomae_pretrain(sd: dict) -> dict:
    """Our MAE keys -> VideoMAE pretraining: encoder./decoder. prefixes, encoder_to_decoder (no bias), no tables."""
    out = {}
    for k, v in sd.items():
        if k == "decoder_embed.bias":
            assert torch.all(v == 0), "VideoMAE's encoder_to_decoder has no bias"
            continue
        for ours, theirs in (("decoder_blocks.", "decoder.blocks."), ("decoder_norm.", "decoder.norm."),
                             ("decoder_pred.", "decoder.head."), ("decoder_embed.", "encoder_to_decoder.")):
            if k.startswith(ours):
                k = theirs + k[len(ours):]
                break
        else:
            k = k if k == "mask_token" or "pos_embed" in k else "encoder." + k
        out[k] = v
    return to_videomae(out, "")


def reference_videomae_pretrain(sd: dict, x: torch.Tensor, mask: torch.Tensor, heads: int, dec_heads: int) -> torch.Tensor:
    """VideoMAE's pretraining forward: predictions for the hidden tokens [B, M, P], in token order."""
    tokens = reference_tokens(x, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"])
    B, L, D = tokens.shape
    h = (tokens + reference_sincos(L, D))[~mask].view(B, -1, D)
    for i in range(len({k.split(".")[2] for k in sd if k.startswith("encoder.blocks.")})):
        h = reference_block(h, sd, f"encoder.blocks.{i}.", heads)
    y = F.linear(layer_norm(h, sd, "encoder.norm."), sd["encoder_to_decoder.weight"])
    pos = reference_sincos(L, y.shape[-1]).expand(B, -1, -1)
    hidden = sd["mask_token"] + pos[mask].view(B, -1, y.shape[-1])
    y = torch.cat([y + pos[~mask].view(B, -1, y.shape[-1]), hidden], 1)
    for i in range(len({k.split(".")[2] for k in sd if k.startswith("decoder.blocks.")})):
        y = reference_block(y, sd, f"decoder.blocks.{i}.", dec_heads)
    y = layer_norm(y[:, -hidden.shape[1]:], sd, "decoder.norm.")
    return F.linear(y, sd["decoder.head.weight"], sd["decoder.head.bias"])


def test_videomae_pretraining_checkpoint_with_layer_scale_reconstructs_exactly() -> None:
    # VideoMAE's pretrain_videomae_small: a 192-d decoder with 3 heads; tubelets regress both frames.
    kw = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, num_heads=2, pred_t_dim=4)
    torch.manual_seed(0)
    src = perturb(MaskedAutoencoderViT.from_kwargs(**kw, cls_embed=False, sep_pos_embed=False, init_values=0.1,
                                       decoder_embed_dim=192, decoder_depth=1, decoder_num_heads=3))
    with torch.no_grad():
        src.decoder_embed.bias.zero_()
        for blk in [*src.blocks, *src.decoder_blocks]:
            dim = blk.attn.qkv.weight.shape[1]
            blk.attn.qkv.bias[dim: 2 * dim] = 0
    ckpt = to_videomae_pretrain(src.state_dict())
    assert "decoder.blocks.0.gamma_1" in ckpt and "encoder_to_decoder.weight" in ckpt
    options = checkpoint_model_options(ckpt)
    assert options["decoder_num_heads"] == 3 and options["decoder_init_values"] > 0 and not options["cls_embed"]
    torch.manual_seed(9)
    model = MaskedAutoencoderViT.from_kwargs(**kw, **options).eval()
    report = load_pretrained(model, ckpt)
    assert not report.missing and not report.unexpected
    x, noise = clips(), torch.rand(2, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, pred, mask = model(x, 0.75, noise)
        hidden = mask.bool()
        expected = reference_videomae_pretrain(ckpt, x, hidden, heads=2, dec_heads=3)
    assert rel_diff(pred[hidden].view(expected.shape), expected) < 1e-5

    # The decoder's gammas with no place in a decoder without layer scale: the decoder is refused.
    no_decoder_scale = MaskedAutoencoderViT.from_kwargs(**{**kw, **options, "decoder_init_values": 0.0})
    with pytest.raises(ValueError, match=r"decoder_blocks\.0\.gamma_1.*decoder_init_values=0\.1.*load_decoder=False"):
        load_pretrained(no_decoder_scale, ckpt)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, f)
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, tmp_path / "evil_zip.pth")
    for p in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(ValueError, match=f"refusing to load {p}"):
            read_weights(p)
    assert not marker.exists()

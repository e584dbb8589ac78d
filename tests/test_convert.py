"""Weight import: each published key/shape layout (written here at tiny sizes) loads and computes the same."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from models.convert import detect_format, load_pretrained, sincos_1d_table
from models.mae import MaskedAutoencoderViT
from models.video_vit import resize_spatial_pos_embed, resize_temporal_pos_embed, separable_pos_table
from models.vit import VisionTransformer
from util.checkpoint import read_weights

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
        bias = {"q": sd[pre + "q_bias"], "k": None, "v": sd[pre + "v_bias"]}[name]
        return F.linear(x, w, bias)

    q, k, v = (lin(n).view(B, N, heads, D // heads).transpose(1, 2) for n in "qkv")
    attn = (q @ k.transpose(-2, -1) / (D // heads) ** 0.5).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, D)
    return F.linear(out, sd[pre + "proj.weight"], sd[pre + "proj.bias"])


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

    classifier = vit()
    report = load_pretrained(classifier, official)
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert not report.missing_encoder and len(report.dropped) > 0
    torch.testing.assert_close(classifier.fc_norm.weight, src.norm.weight)  # pooled norm = encoder norm
    with torch.no_grad():
        torch.testing.assert_close(classifier.blocks[0].attn(tokens),
                                   reference_attention(tokens, official, "blocks.0.attn.", heads=2))


def test_pyslowfast_pyth_with_pred_head_decoder_and_joint_decoder_table(tmp_path: Path) -> None:
    src = randomize(mae())
    sd = split_qkv(src.state_dict())
    pyth = {}
    for k, v in sd.items():
        k = k.replace("decoder_blocks.", "pred_head.transforms.0.").replace("decoder_norm.", "pred_head.transforms.0.2.")
        pyth[k.replace("decoder_pred.", "pred_head.projections.0.")] = v
    dec = separable_pos_table(pyth.pop("decoder_pos_embed_spatial"), pyth.pop("decoder_pos_embed_temporal"))
    pyth["decoder_pos_embed"] = torch.cat([pyth.pop("decoder_pos_embed_class"), dec], dim=1)
    assert pyth["decoder_pos_embed"].shape == (1, 1 + 2 * 4 * 4, 32)
    torch.save({"model_state": pyth, "epoch": 400}, tmp_path / "k400.pyth")

    dst = mae(seed=5)
    report = load_pretrained(dst, read_weights(tmp_path / "k400.pyth"))
    assert report.source_format == "pyslowfast" and not report.missing and not report.unexpected
    assert any("least squares" in n for n in report.notes)
    x, noise = clips(), torch.rand(2, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # a separable table survives the joint round trip exactly
        torch.testing.assert_close(src(x, 0.75, noise)[0], dst(x, 0.75, noise)[0])

    # A fine-tuned .pyth: head under head.projection.
    head = {"head.projection.weight": torch.randn(5, 32), "head.projection.bias": torch.randn(5)}
    classifier = vit()
    report = load_pretrained(classifier, {**pyth, **head})
    assert not report.missing and torch.equal(classifier.head.weight, head["head.projection.weight"])


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
    src = randomize(MaskedAutoencoderViT(img_size=112, num_frames=8, **big, **DEC))
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

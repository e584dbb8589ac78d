"""How fine-tuning starts from pretraining weights, per format: head init (mae_st) and fc_norm (VideoMAE)."""

from __future__ import annotations

import math

import torch

from models import create_model
from models.convert import load_pretrained
from tests.test_convert import SMALL, mae, randomize, to_videomae


def classifier(seed: int = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("vit_micro_patch8", **{**SMALL, "num_classes": 400, "dropout": 0.0, **kw})


def test_head_weight_is_near_zero_and_bias_is_nn_linears_default() -> None:
    # mae_st main_finetune.py: trunc_normal_(head.weight, std=2e-5) after loading; the bias keeps
    # nn.Linear's reset_parameters draw, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = embed_dim = 32.
    model = classifier()
    bias, bound = model.head.bias.detach(), 1 / math.sqrt(32)
    assert bias.abs().max() <= bound and bias.abs().max() > 0.9 * bound
    assert abs(float(bias.std()) - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)  # uniform's std
    assert float(model.head.weight.detach().std()) < 1e-4


def test_head_bias_survives_loading_pretraining_weights() -> None:
    model = classifier(cls_embed=False)
    before = model.head.bias.detach().clone()
    report = load_pretrained(model, randomize(mae(cls_embed=False)).state_dict())
    assert "head.bias" in report.missing  # an MAE has no head: it stays as initialised
    assert torch.equal(model.head.bias, before) and before.abs().sum() > 0


def _pretrained_encoder() -> dict:
    """A randomised MAE's encoder keys with a non-trivial final norm (what pretraining leaves)."""
    sd = {k: v for k, v in randomize(mae(sep_pos_embed=False, cls_embed=False)).state_dict().items()
          if not k.startswith(("decoder", "mask_token"))}
    for blk in range(2):  # VideoMAE's key projection has no bias
        sd[f"blocks.{blk}.attn.qkv.bias"][32:64] = 0
    return sd


def test_mae_st_and_ours_apply_the_pretrained_norm_to_pooled_features() -> None:
    # mae_st models_vit.py: x[:, 1:].mean(1) then self.norm(x), with `norm` loaded from the pretraining file.
    sd = _pretrained_encoder()
    model = classifier(sep_pos_embed=False, cls_embed=False)
    load_pretrained(model, sd)
    assert torch.equal(model.fc_norm.weight, sd["norm.weight"]) and torch.equal(model.fc_norm.bias, sd["norm.bias"])


def test_videomae_pretraining_norm_is_dropped_and_fc_norm_starts_at_identity() -> None:
    # VideoMAE modeling_finetune.py: with mean pooling `norm` is nn.Identity and `fc_norm` a fresh LayerNorm
    # (weight 1, bias 0); the pretraining file's encoder.norm has no place to go.
    sd = _pretrained_encoder()
    ckpt = {**to_videomae(sd, "encoder."), "encoder_to_decoder.weight": torch.randn(16, 32),
            "mask_token": torch.zeros(1, 1, 16)}
    model = classifier(sep_pos_embed=False, cls_embed=False)
    report = load_pretrained(model, ckpt)
    assert report.source_format == "videomae" and {"norm.weight", "norm.bias"} <= set(report.dropped)
    assert torch.equal(model.fc_norm.weight, torch.ones(32)) and torch.equal(model.fc_norm.bias, torch.zeros(32))
    assert not report.missing_encoder and not report.unexpected
    assert torch.equal(model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])

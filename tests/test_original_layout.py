"""Checkpoints written by the original training code (mae_st / VideoMAE `save_model`) import weights-only."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import create_model
from util.safe_load import UnsafeCheckpointError, load_weights_file
from util.weights import read_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--synthetic_videos", "16", "--input_size", "32", "--num_frames", "4", "--batch_size", "2",
        "--repeat_aug", "1", "--num_workers", "0", "--epochs", "1", "--precision", "fp32", "--max_steps", "1"]


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def original_layout(path: Path, args: argparse.Namespace) -> dict:
    """A micro MAE saved as mae_st's misc.save_model does: model, optimizer, epoch, scaler, args."""
    torch.manual_seed(0)
    mae = create_model("mae_vit_micro_patch8", img_size=32, num_frames=4, decoder_embed_dim=64, decoder_depth=1)
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    mae(torch.randn(2, 3, 4, 32, 32), 0.5)[0].backward()
    opt.step()
    sd = mae.state_dict()
    torch.save({"model": sd, "optimizer": opt.state_dict(), "epoch": 399, "scaler": {"scale": 65536.0}, "args": args},
               path)
    return sd


def mae_st_args() -> argparse.Namespace:
    """The kind of values mae_st's parser leaves in `args` (strings, numbers, bools, None, lists, tuples)."""
    return argparse.Namespace(model="mae_vit_micro_patch8", batch_size=2, epochs=400, blr=1.6e-3, lr=None,
                              norm_pix_loss=True, output_dir="./output", repeat_aug=4, beta=None,
                              pred_t_dim=8, trunc_init=False, gpu=0, dist_url="env://", input_size=(32, 32))


def test_namespace_of_plain_values_loads_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-00399.pth"
    sd = original_layout(path, mae_st_args())
    obj = load_weights_file(path)
    assert isinstance(obj["args"], argparse.Namespace) and obj["args"].epochs == 400 and obj["args"].lr is None
    assert obj["args"].input_size == (32, 32) and obj["epoch"] == 399
    weights = read_weights(path)
    assert weights.keys() == sd.keys() and all(torch.equal(weights[k], sd[k]) for k in sd)


def test_namespace_holding_code_is_still_refused(tmp_path: Path) -> None:
    # The Namespace is admitted, its values are not: they pass the same weights-only unpickler.
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    original_layout(path, argparse.Namespace(model="x", hook=Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load_weights_file(path)
    assert not marker.exists()


def test_other_argparse_objects_are_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "parser.pth"
    original_layout(path, argparse.FileType("r"))  # only Namespace is admitted, not its neighbours
    with pytest.raises(UnsafeCheckpointError, match="argparse.FileType"):
        load_weights_file(path)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # end to end in subprocesses: .ci/run's slow step runs it
def test_original_layout_imports_through_finetune_init_from_and_export(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-00399.pth"
    original_layout(path, mae_st_args())
    finetune = _run("main_finetune.py", "--output_dir", str(tmp_path / "ft"), *TINY, "--finetune", str(path),
                    "--test_num_temporal_views", "1", "--test_num_spatial_crops", "1")
    assert finetune.returncode == 0, finetune.stderr[-3000:]
    pre_out = tmp_path / "pre"
    pretrain = _run("main_pretrain.py", "--output_dir", str(pre_out), *TINY, "--init_from", str(path),
                    "--pred_t_dim", "2", "--decoder_embed_dim", "64", "--decoder_depth", "1", "--vis_every", "0")
    assert pretrain.returncode == 0, pretrain.stderr[-3000:]
    # The run started from the imported weights exports like any other run of this project.
    export = _run("-m", "util.checkpoint", "export", str(pre_out / "checkpoints" / "latest"), str(tmp_path / "w.pth"))
    assert export.returncode == 0, export.stderr[-3000:]
    assert read_weights(tmp_path / "w.pth").keys() == read_weights(path).keys()


@pytest.mark.slow  # end to end in subprocesses: .ci/run's slow step runs it
def test_init_from_unexpected_keys_names_the_flag_main_pretrain_offers(tmp_path: Path) -> None:
    # Layer-scale gammas have no place in a model built without --init_values: refused, naming the way out
    # that this main has; with it the run starts (the gammas are dropped).
    torch.manual_seed(0)
    src = create_model("mae_vit_micro_patch8", img_size=32, num_frames=4, decoder_embed_dim=64, decoder_depth=1,
                       init_values=0.1)
    path = tmp_path / "layer_scale.pth"
    torch.save({"model": src.state_dict()}, path)
    flags = ["--pred_t_dim", "2", "--decoder_embed_dim", "64", "--decoder_depth", "1", "--vis_every", "0",
             "--decoder_init_values", "0.1", "--init_from", str(path)]
    refused = _run("main_pretrain.py", "--output_dir", str(tmp_path / "a"), *TINY, *flags)
    assert refused.returncode != 0
    assert "--allow_unexpected_keys" in refused.stderr and "layer_scale.pth" in refused.stderr, refused.stderr[-2000:]
    accepted = _run("main_pretrain.py", "--output_dir", str(tmp_path / "b"), *TINY, *flags, "--allow_unexpected_keys")
    assert accepted.returncode == 0, accepted.stderr[-3000:]

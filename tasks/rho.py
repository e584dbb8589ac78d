"""rho-BYOL / rho-MoCo (Feichtenhofer et al., 2021): rho clips of one video are each other's positives.

`python main_pretrain.py --objective rho_byol` (or `rho_moco`). The momentum encoder follows each
optimiser step (cosine-annealed momentum), MoCo's queue takes every rank's keys in rank order. The
task fixes `--repeat_aug` to `--rho` (rho clips per decode) through `run_overrides`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from models import create_model
from tasks.common import StartConfig, load_start_weights
from util.config import ConfigError, RunConfig, flag, non_negative, positive, section
from util.cross_rank import all_gather_cat, convert_batchnorm, cosine_momentum, ema_update
from util.task import RunContext, Task

DEMO_CONFIG = "rho_demo.yaml"


@dataclass
class RhoConfig:
    """rho clips per video, their augmentation, the heads and the momentum encoder."""

    rho: int = flag(2, "rho objectives: clips per video (sets --repeat_aug); each clip's positives are the other rho - 1",
                    check=lambda r: r >= 2, rule=">= 2")
    rho_timespan: float = flag(0.0, "rho objectives: the clips of a video start at most this many seconds apart "
                               "(0: anywhere in the video)", check=non_negative, rule=">= 0")
    rho_rand_aug: str = flag("rand-m7-n2-mstd0.5-inc1", "clip-consistent RandAugment of each rho clip ('': off)")
    proj_dim: int = flag(256, "projection (and MoCo key) dimension", check=positive, rule="> 0")
    proj_hidden_dim: int = flag(4096, "hidden width of the projector MLP", check=positive, rule="> 0")
    proj_layers: int = flag(2, "linear layers of the projector (BatchNorm + ReLU between)", check=lambda n: n >= 2,
                            rule=">= 2")
    pred_hidden_dim: int = flag(4096, "hidden width of BYOL's predictor MLP", check=positive, rule="> 0")
    ema_momentum: float = flag(0.996, "momentum encoder's initial momentum, cosine-annealed to 1",
                               check=lambda m: 0 <= m < 1, rule="in [0, 1)")
    moco_temperature: float = flag(0.1, "MoCo's softmax temperature", check=positive, rule="> 0")
    moco_queue: int = flag(65536, "MoCo's queue of negative keys", check=positive, rule="> 0")


SECTIONS = (("pretraining", StartConfig), ("rho objectives", RhoConfig))


class RhoTask(Task):
    """rho-BYOL / rho-MoCo pretraining; the momentum update and MoCo's enqueue follow each optimiser step."""

    name = "rho pretraining"
    architecture_flags = ("objective", "proj_dim", "proj_hidden_dim", "proj_layers", "pred_hidden_dim", "moco_queue")

    def __init__(self, start: StartConfig, cfg: RhoConfig) -> None:
        self.start, self.cfg, self.objective = start, cfg, start.objective.removeprefix("rho_")
        self.keys: list[torch.Tensor] = []

    def run_overrides(self) -> dict[str, int]:
        return {"repeat_aug": self.cfg.rho}  # rho clips per decode

    def check_run(self, cfg: RunConfig) -> None:
        p = cfg.parallel
        if p.dist == "deepspeed" and p.precision != "fp32":  # its bf16 module would hold the momentum copy in bf16
            raise ConfigError("rho objectives under --dist deepspeed need --precision fp32: DeepSpeed casts the "
                              "momentum encoder to 16 bits, where updates of (1 - momentum) x the difference round "
                              "away; use --dist fsdp (fp32 shards, bf16 compute) or ddp")

    def setup(self, ctx: RunContext) -> None:
        self.data_path = ctx.resolve_data_path()

    def build_model(self, ctx: RunContext) -> nn.Module:
        m, c = ctx.cfg.model, self.cfg
        name = "rho_vit_" + m.model.removeprefix("mae_vit_").removeprefix("vit_").removeprefix("rho_vit_")
        self.model = convert_batchnorm(create_model(  # BatchNorm of the MLP heads over the global batch
            name, objective=self.objective, rho=c.rho, img_size=m.input_size, num_frames=m.num_frames,
            t_patch_size=m.t_patch_size, cls_embed=m.cls_embed, sep_pos_embed=m.sep_pos_embed,
            init_values=m.init_values, proj_dim=c.proj_dim, proj_hidden_dim=c.proj_hidden_dim,
            proj_layers=c.proj_layers, pred_hidden_dim=c.pred_hidden_dim, temperature=c.moco_temperature,
            queue_size=c.moco_queue))
        return self.model

    def init_weights(self, model: nn.Module, ctx: RunContext) -> None:
        if self.start.init_from:
            load_start_weights(model, self.start)
            model.copy_to_momentum()

    def build_train_dataset(self, ctx: RunContext) -> torch.utils.data.Dataset:
        return ctx.video_dataset(self.data_path, "train", "pretrain", repeat_aug=self.cfg.rho,
                                 rand_aug=self.cfg.rho_rand_aug or None, clip_timespan=self.cfg.rho_timespan or None)

    def loss(self, module: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        loss, metrics, keys = module(batch["clips"])
        if keys is not None:
            self.keys.append(keys.detach())  # enqueued after the step, as MoCo does after each batch
        return {"loss": loss, **metrics}

    def after_step(self, ctx: RunContext) -> None:
        st = ctx.state
        progress = (st.epoch + st.consumed / ctx.samples_per_epoch) / ctx.cfg.loop.epochs
        ema_update(self.model.momentum_pairs(), cosine_momentum(self.cfg.ema_momentum, progress))
        if self.keys:  # every rank's keys, in rank order: the queue stays the same on every rank
            self.model.enqueue(all_gather_cat(torch.cat(self.keys)))
            self.keys.clear()

    def flops_per_clip(self, model: nn.Module) -> float:
        return model.flops_per_clip()["train_step"]


def make_task(args: argparse.Namespace) -> RhoTask:
    """The rho task of parsed flags."""
    return RhoTask(*(section(cls, args) for _, cls in SECTIONS))

"""Models built by name, like timm: `create_model("mae_vit_large_patch16", num_frames=16)`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models import mae, rho, vit

MODELS: dict[str, Callable[..., nn.Module]] = {
    name: getattr(module, name)
    for module in (mae, rho, vit)
    for name in dir(module)
    if name.startswith(("mae_vit_", "rho_vit_", "vit_")) and callable(getattr(module, name))
}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; unknown names list the valid ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)

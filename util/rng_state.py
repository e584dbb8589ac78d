"""RNG state as a checkpoint entry: python / numpy / torch / cuda streams of every rank.

`RankRngState` is the stateful object the checkpointer saves under "rng": a list with one entry per
rank. On the same world size each rank continues its own streams exactly; on another one every rank
takes rank 0's (per-rank streams cannot carry over; data randomness is per sample anyway).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from util import distributed as du


def rng_state() -> dict:
    """This process's python / numpy / torch / cuda RNG states, as weights_only-loadable values."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RankRngState:
    """Every rank's RNG streams as one checkpoint entry (a list indexed by rank)."""

    def state_dict(self) -> list[dict]:
        """Collective (every rank calls it): each rank's `rng_state()`, gathered in rank order."""
        return du.all_gather_object(rng_state())

    def load_state_dict(self, rngs: list[dict]) -> None:
        """This rank's own streams when the world size is the saved one, else rank 0's."""
        if not isinstance(rngs, list):
            raise TypeError(f"the RNG entry is a {type(rngs).__name__}, not a list with one state per rank")
        rank = du.get_rank()
        if rank < len(rngs) and len(rngs) == du.get_world_size():
            set_rng_state(rngs[rank])
        elif rngs:
            set_rng_state(rngs[0])

"""Samplers whose position survives a restart, and whose batches do not depend on the world size.

The training order is one global permutation per epoch, seeded by (seed, epoch). It is cut into
global batches of `batch_size * num_replicas`; rank r takes the contiguous slice [r*b, (r+1)*b) of
each. So 2 ranks x b see exactly the samples of 1 rank x 2b, and the position in an epoch is a single
world-size-free number: `consumed`, the global samples already used.
"""

import numpy as np


class ResumableDistributedSampler:
    """Yields `(epoch, index)` for this rank; `state_dict()`/`load_state_dict()` resume mid-epoch."""

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, batch_size: int = 1, drop_last: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.dataset_len, self.num_replicas, self.rank = dataset_len, num_replicas, rank
        self.shuffle, self.seed, self.batch_size, self.drop_last = shuffle, seed, batch_size, drop_last
        self.epoch, self.consumed = 0, 0

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks."""
        return self.batch_size * self.num_replicas

    def _remaining(self) -> np.ndarray:
        """Indices this rank still has to yield in the current epoch, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.dataset_len)
        else:
            order = np.arange(self.dataset_len)
        rest = order[self.consumed:]
        if self.drop_last:
            rest = rest[:len(rest) // self.global_batch * self.global_batch]
        elif len(rest) % self.global_batch:
            # wrap around so every rank gets the same number of samples (as DistributedSampler does)
            rest = np.concatenate([rest, np.resize(order, -len(rest) % self.global_batch)])
        b = self.batch_size
        return rest.reshape(-1, self.global_batch)[:, self.rank * b:(self.rank + 1) * b].reshape(-1)

    def __iter__(self):
        """Yield the remaining `(epoch, index)` pairs of this rank for the current epoch."""
        epoch = self.epoch
        for index in self._remaining():
            yield epoch, int(index)

    def __len__(self) -> int:
        """Samples left for this rank in the current epoch."""
        return len(self._remaining())

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning unless it is the epoch a restored state points into."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def advance(self, num_global_samples: int) -> None:
        """Record that `num_global_samples` (summed over all ranks) were consumed by a step."""
        self.consumed += num_global_samples

    def set_consumed(self, consumed: int) -> None:
        """Set the number of global samples already consumed in the current epoch."""
        self.consumed = consumed

    def state_dict(self) -> dict:
        """Position in the run: {"epoch", "consumed"} (global samples, world-size independent)."""
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; the next iteration yields exactly the samples not yet consumed."""
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


class DistributedEvalSampler:
    """Every index exactly once over all ranks, no padding: rank r takes a contiguous shard."""

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0):
        # contiguous shards keep all views of a test video on one rank in the common case
        bounds = np.linspace(0, dataset_len, num_replicas + 1).round().astype(int)
        self.start, self.stop = int(bounds[rank]), int(bounds[rank + 1])

    def __iter__(self):
        """Yield this rank's indices in order."""
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        """Number of indices on this rank (may differ by one between ranks)."""
        return self.stop - self.start

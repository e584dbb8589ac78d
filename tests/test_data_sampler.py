"""Resumable sampler: world-size-free batches and exact mid-epoch resume; eval sampler coverage."""

import pytest

from datasets.sampler import DistributedEvalSampler, ResumableDistributedSampler


def _run(n, world, b, epoch, consumed=0, seed=3, drop_last=True):
    """Indices per global step as the trainer sees them: rank chunks concatenated in rank order."""
    samplers = [ResumableDistributedSampler(n, world, r, seed=seed, batch_size=b, drop_last=drop_last)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
        s.set_consumed(consumed)
    per_rank = [[i for e, i in s] for s in samplers]
    assert len({len(p) for p in per_rank}) == 1, "ranks must get equal counts"
    steps = len(per_rank[0]) // b
    return [i for step in range(steps) for p in per_rank for i in p[step * b:(step + 1) * b]], samplers


def test_two_ranks_see_the_batches_of_one_rank():
    one, _ = _run(23, 1, 4, epoch=1)
    two, _ = _run(23, 2, 2, epoch=1)
    assert one == two and len(one) == 20 and len(set(one)) == 20
    assert _run(23, 1, 4, epoch=2)[0] != one  # new permutation per epoch


@pytest.mark.parametrize("world_before,world_after", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_resume_mid_epoch_yields_exactly_the_rest(world_before, world_after):
    n, global_batch, k = 37, 4, 3
    full, _ = _run(n, 1, global_batch, epoch=1)
    ranks = [ResumableDistributedSampler(n, world_before, r, seed=3, batch_size=global_batch // world_before)
             for r in range(world_before)]
    for s in ranks:
        s.set_epoch(1)
        it = iter(s)
        for _ in range(k * s.batch_size):  # k steps on every rank
            e, _ = next(it)
            assert e == 1
        s.advance(global_batch * k)
    state = ranks[0].state_dict()
    assert state == {"epoch": 1, "consumed": k * global_batch}
    restored = []
    for r in range(world_after):
        s = ResumableDistributedSampler(n, world_after, r, seed=3, batch_size=global_batch // world_after)
        s.load_state_dict(state)
        s.set_epoch(1)  # the trainer's epoch loop calls this again: must not rewind
        assert len(s) == (len(full) - k * global_batch) // world_after
        restored.append([i for _, i in s])
    b = global_batch // world_after
    merged = [i for step in range(len(restored[0]) // b) for p in restored for i in p[step * b:(step + 1) * b]]
    assert merged == full[k * global_batch:]
    s.set_epoch(2)
    assert len(s) == len(full) // world_after  # a new epoch starts from its beginning


def test_no_drop_last_pads_evenly():
    idx, samplers = _run(10, 2, 2, epoch=0, drop_last=False)
    assert len(idx) == 12 and set(idx) == set(range(10))


@pytest.mark.parametrize("n", [1, 7, 10])
def test_eval_sampler_every_index_once(n):
    shards = [list(DistributedEvalSampler(n, 2, r)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(n))
    assert sum(len(DistributedEvalSampler(n, 2, r)) for r in range(2)) == n

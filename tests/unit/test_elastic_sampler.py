"""nd.elastic.ElasticSampler's arithmetic: what is left of an epoch after a change of membership."""

from __future__ import annotations

import pytest

import nanodist.torch as nd
from nanodist.torch.elastic import ElasticSampler

BATCH = 4


@pytest.fixture(autouse=True)
def alone(monkeypatch):
    monkeypatch.delenv("NANODIST_RUN_ID", raising=False)
    nd.init()
    yield
    nd.shutdown()


def samplers(length: int, size: int) -> list[ElasticSampler]:
    group = [ElasticSampler(range(length), seed=3) for _ in range(size)]
    for rank, sampler in enumerate(group):
        sampler.reshard(rank, size)
    return group


def train(group: list[ElasticSampler], batches: int) -> list[int]:
    """Every worker takes `batches` batches in step, as a synchronous group does; the samples taken."""
    taken = []
    for sampler in group:
        shard = list(sampler)
        for i in range(batches):
            taken += shard[i * BATCH : (i + 1) * BATCH]
            sampler.record_batch(i, BATCH)
    return taken


def test_after_a_worker_leaves_the_rest_of_the_epoch_is_split_over_the_others_once():
    three = samplers(101, 3)
    before = train(three, 5)
    survivors = three[1:]  # rank 0 left; everyone agrees on rank 0's state (the run syncs it)
    for rank, sampler in enumerate(survivors):
        sampler.load_state_dict(three[0].state_dict())
        sampler.reshard(rank, 2)
    after = train(survivors, len(survivors[0]) // BATCH + 1)
    assert len(before) == 60 and len(set(before) | set(after)) == len(before) + len(after)
    assert len(before) + len(after) == 60 + (101 - 60) // 2 * 2  # a tail shorter than the group is left out


def test_a_new_epoch_starts_over_in_a_new_order_and_the_same_epoch_keeps_its_place():
    (sampler,) = samplers(40, 1)
    train([sampler], 2)
    sampler.set_epoch(0)
    sampler.reshard(0, 1)
    assert len(sampler) == 40 - 2 * BATCH
    first = list(sampler)
    sampler.set_epoch(1)
    assert len(sampler) == 40 and sorted(sampler) == list(range(40)) and list(sampler)[:32] != first


def test_processed_indices_are_every_worker_s_before_a_change_and_this_one_s_since():
    three = samplers(101, 3)
    before = train(three, 2)
    survivor = three[1]
    survivor.reshard(0, 2)
    assert survivor.processed_indices == set(before)
    shard = list(survivor)
    survivor.record_batch(0, BATCH)
    assert survivor.processed_indices == set(before) | set(shard[:BATCH])
    saved = survivor.state_dict()
    survivor.record_batch(2, BATCH)
    survivor.load_state_dict(saved)  # a rollback forgets what was trained on after the commit
    assert survivor.processed_indices == set(before) | set(shard[:BATCH])

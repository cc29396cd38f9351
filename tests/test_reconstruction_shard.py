"""Reconstruction row shards and batch samplers (one process here; the ranks in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from diffusers_ptq import PTQConfig, distributed, quantize_pipeline
from diffusers_ptq.reconstruction.config import ReconstructionConfig
from diffusers_ptq.reconstruction.shard import BatchSampler, RowShard


def test_random_batches_are_brecqs_randperm_draw():
    train = torch.tensor([0, 2, 3, 5, 7, 8, 9])
    sampler = BatchSampler(train, 4, "random")
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(3):
        assert torch.equal(sampler.draw(a), train[torch.randperm(len(train), generator=b)[:4]])
    assert BatchSampler(train, 50, "random").batch_size == 7  # at most every training row


def test_stratified_batches_take_one_row_from_each_slice():
    train = torch.arange(100, 110)  # 10 rows in 4 strata: 3, 3, 2, 2
    sampler = BatchSampler(train, 4, "stratified")
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        batch = sampler.draw(gen)
        assert batch[0] in train[0:3] and batch[1] in train[3:6]
        assert batch[2] in train[6:8] and batch[3] in train[8:10]
        seen.update(batch.tolist())
    assert seen == set(train.tolist())  # every row is drawn


def test_one_process_owns_every_row_in_order():
    split = (torch.tensor([0, 1, 3, 4]), torch.tensor([2]))
    shard = RowShard.plan(5, split, 2, "stratified")
    assert not shard.sharded and torch.equal(shard.owned, torch.arange(5))
    assert torch.equal(shard.local(torch.tensor([4, 0, 2])), torch.tensor([4, 0, 2]))


def test_batch_sampling_is_validated():
    with pytest.raises(ValueError, match=r"reconstruction.batch_sampling='uniform'.*random.*stratified"):
        ReconstructionConfig(batch_sampling="uniform").validate()


def test_distributed_true_without_a_launcher_says_how_to_launch(ddim_pipe, monkeypatch):
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"distributed=True needs a launcher's environment.*torchrun"):
        quantize_pipeline(ddim_pipe, PTQConfig(), distributed=True, progress=False)
    assert not distributed.is_initialized()
    assert not hasattr(ddim_pipe.unet, "ptq_state")

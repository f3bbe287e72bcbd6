"""RowSparseAdafactor: sparse gradients of an embedding table get exactly the dense Adafactor update,
alone and inside the DeepSpeed engine (gradient accumulation, gradient clipping, weight decay)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core.optim import RowSparseAdafactor
from core.train_config import TrainConfig

ADAFACTOR = dict(lr=0.05, scale_parameter=True, relative_step=False, warmup_init=False, clip_threshold=1.0, beta1=None)


class _Bag(nn.Module):
    """An embedding table (dense or sparse gradients) under a linear layer: the n-gram table's shape."""

    def __init__(self, sparse: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.table = nn.Embedding(97, 8, sparse=sparse)
        self.out = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.table(ids).mean(dim=1)).pow(2).sum()


def _groups(model: nn.Module) -> list[dict]:
    return [{"params": [model.table.weight, model.out.weight], "weight_decay": 0.01},
            {"params": [model.out.bias], "weight_decay": 0.0}]


def test_sparse_update_equals_dense_adafactor():
    from transformers.optimization import Adafactor

    dense, sparse = _Bag(sparse=False), _Bag(sparse=True)
    reference, optimizer = Adafactor(_groups(dense), **ADAFACTOR), RowSparseAdafactor(_groups(sparse), **ADAFACTOR)
    generator = torch.Generator().manual_seed(1)
    for _ in range(25):
        ids = torch.randint(0, 40, (4, 6), generator=generator)  # rows 40..96 are never touched
        for model, opt in ((dense, reference), (sparse, optimizer)):
            opt.zero_grad()
            model(ids).backward()
            opt.step()
    assert sparse.table.weight.grad.is_sparse
    torch.testing.assert_close(sparse.table.weight, dense.table.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.out.weight, dense.out.weight, rtol=1e-5, atol=1e-6)
    state, ref_state = optimizer.state[sparse.table.weight], reference.state[dense.table.weight]
    torch.testing.assert_close(state["exp_avg_sq_row"], ref_state["exp_avg_sq_row"])
    torch.testing.assert_close(state["exp_avg_sq_col"], ref_state["exp_avg_sq_col"])
    # Untouched rows moved only by weight decay, as in the dense update: not frozen.
    assert not torch.equal(sparse.table.weight[40:], _Bag(sparse=True).table.weight[40:])


def test_sparse_gradients_refused_with_momentum():
    model = _Bag(sparse=True)
    optimizer = RowSparseAdafactor(_groups(model), **{**ADAFACTOR, "beta1": 0.9})
    model(torch.tensor([[1, 2, 3]])).backward()
    with pytest.raises(RuntimeError, match="beta1=None"):
        optimizer.step()


@pytest.fixture(scope="module")
def dist():
    from core.distributed import init_distributed

    return init_distributed(num_threads=1)


def test_engine_trains_a_sparse_table_as_a_dense_one(dist):
    """DeepSpeed turns sparse gradients into its SparseTensor and back, accumulates micro-batches and
    clips the global norm: the weights must still follow the dense run."""
    from core.distributed import build_engine

    # grad_clip small enough to bind: the clipping sees the sparse table's norm as well.
    cfg = TrainConfig(optimizer="adafactor", lr=0.05, micro_batch_size=2, global_batch_size=4, max_steps=8,
                      warmup_steps=1, grad_clip=0.05, zero_stage=0)
    engines = [build_engine(_Bag(sparse=sparse), copy.deepcopy(cfg), dist) for sparse in (False, True)]
    generator = torch.Generator().manual_seed(2)
    for _ in range(8 * 2):  # 8 steps of 2 micro-batches
        ids = torch.randint(0, 40, (2, 5), generator=generator)
        for engine in engines:
            engine.backward(engine(ids))
            engine.step()
    dense, sparse = (engine.module for engine in engines)
    assert isinstance(engines[1].optimizer, RowSparseAdafactor)
    torch.testing.assert_close(sparse.table.weight, dense.table.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.out.weight, dense.out.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [{"optimizer": "adamw"}, {"zero_stage": 1}], ids=["adamw", "zero1"])
def test_engine_refuses_sparse_tables_it_cannot_update(dist, overrides):
    from core.config import ConfigError
    from core.distributed import build_engine

    cfg = TrainConfig(**{"optimizer": "adafactor", "micro_batch_size": 2, "global_batch_size": 2, "max_steps": 2,
                         "warmup_steps": 1, "zero_stage": 0, **overrides})
    with pytest.raises(ConfigError, match="sparse gradients"):
        build_engine(_Bag(sparse=True), cfg, dist)


def test_finetune_makes_the_ngram_table_sparse_only_where_the_update_is_exact():
    from student.config import FinetuneConfig
    from student.nlu import sparse_ngrams

    assert not sparse_ngrams(FinetuneConfig(head="encoder", ngram_buckets=0))
    adafactor = FinetuneConfig(head="encoder", ngram_buckets=64)
    adafactor.train.optimizer, adafactor.train.zero_stage = "adafactor", 0
    assert sparse_ngrams(adafactor)
    adafactor.train.zero_stage = 1  # (refused with Adafactor at start-up; dense regardless)
    assert not sparse_ngrams(adafactor)
    adafactor.train.zero_stage = 0
    adafactor.train.optimizer = "adamw"
    assert not sparse_ngrams(adafactor)

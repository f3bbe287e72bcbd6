"""Data order: a resumable, rank-sharded sampler and the evaluation split over ranks.

- `ResumableSampler`: a deterministic permutation per (seed, epoch), sharded by rank, resumable
  from the checkpointed data position.
- `eval_micro_batches`: which held-out micro-batches a rank evaluates.
"""

from __future__ import annotations

from typing import Any

from core.checkpoint import TrainState
from core.config import ConfigError


class ResumableSampler:
    """Deterministic, rank-sharded data order that can restart from any checkpointed position.

    Each epoch is a permutation of range(num_examples) drawn from (seed, epoch). An optimizer step
    consumes the next `global_batch_size` indices of it: micro-step i of rank r takes the slice
    [(i * world_size + r) * micro_batch_size, ... + micro_batch_size) of that block. A trailing block
    smaller than a global batch is dropped so every rank runs the same number of steps.

    With `lengths` (one per example, e.g. tokens), batches are grouped by length: each run of
    `group_batches` global batches of the permutation is sorted by length, cut into global batches,
    and those are put back in a seeded random order. A batch then pads to a length close to that of
    each of its examples, and every rank's micro-batch has about the same length, so no rank waits
    for a long one; the epoch still visits every example once in a random batch order.
    """

    def __init__(self, num_examples: int, micro_batch_size: int, grad_accum_steps: int, rank: int,
                 world_size: int, seed: int, lengths: Any = None, group_batches: int = 64) -> None:
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_examples} examples")
        if group_batches < 1:
            raise ValueError(f"group_batches must be >= 1, got {group_batches}")
        self.lengths = lengths
        self.group_batches = group_batches
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.global_batch_size = micro_batch_size * grad_accum_steps * world_size
        self.steps_per_epoch = num_examples // self.global_batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the training data has {num_examples} examples, fewer than one global batch "
                f"({self.global_batch_size}); lower train.global_batch_size or add data"
            )
        self._cached: tuple[int, Any] | None = None

    def epoch_order(self, epoch: int) -> Any:
        """The permutation for `epoch` (numpy int64 array); identical on every rank."""
        if self._cached is None or self._cached[0] != epoch:
            import numpy as np

            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num_examples)
            if self.lengths is not None:
                order = self._group_by_length(order, rng)
            self._cached = (epoch, order)
        return self._cached[1]

    def _group_by_length(self, order: Any, rng: Any) -> Any:
        import numpy as np

        lengths = np.asarray(self.lengths)
        batch = self.global_batch_size
        used = self.steps_per_epoch * batch  # the trailing partial batch stays at the end, dropped
        out = [order[used:]]
        for start in range(0, used, batch * self.group_batches):
            chunk = order[start : min(start + batch * self.group_batches, used)]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            blocks = chunk.reshape(-1, batch)
            out.insert(-1, blocks[rng.permutation(len(blocks))].reshape(-1))
        return np.concatenate(out)

    def micro_batches(self, epoch: int, position: int) -> list[list[int]]:
        """This rank's grad_accum_steps micro-batches (lists of dataset indices) for the step at `position`."""
        order = self.epoch_order(epoch)
        out = []
        for micro in range(self.grad_accum_steps):
            start = position + (micro * self.world_size + self.rank) * self.micro_batch_size
            out.append([int(i) for i in order[start : start + self.micro_batch_size]])
        return out

    def advance(self, state: TrainState) -> None:
        """Move `state`'s data position past one global batch, rolling over to the next epoch."""
        state.examples_seen += self.global_batch_size
        state.epoch_position += self.global_batch_size
        if state.epoch_position + self.global_batch_size > self.steps_per_epoch * self.global_batch_size:
            state.epoch += 1
            state.epoch_position = 0


def eval_micro_batches(num_examples: int, micro_batch_size: int, num_batches: int, rank: int,
                       world_size: int) -> list[list[int]]:
    """A fixed held-out subset: the first num_batches * micro_batch_size * world_size examples, sharded
    by rank; the same every evaluation so held-out losses are comparable.

    Every rank gets the same number of full micro-batches (under ZeRO-3 a forward is a collective, so
    uneven counts would hang); fewer than num_batches when the held-out set is small.
    """
    per_round = micro_batch_size * world_size
    available = min(num_batches, num_examples // per_round)
    if available < 1:
        raise ConfigError(
            f"the held-out data has {num_examples} examples, fewer than one evaluation round "
            f"(micro_batch_size {micro_batch_size} x world size {world_size}); add held-out data"
        )
    return [list(range(b * per_round + rank * micro_batch_size, b * per_round + (rank + 1) * micro_batch_size))
            for b in range(available)]

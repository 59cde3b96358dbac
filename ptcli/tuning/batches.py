"""Which rows form each training batch: a stateless, seeded order per member over the pooled rows of all tags."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ptcli.config import TaskConfig
from ptcli.tuning.task import Task


class BatchOrder:
    """Which examples form global batch `step`: a fresh seeded shuffle each epoch.

    Stateless in the step, so a resumed run sees exactly the batches it would have seen.
    Given the examples' lengths, each epoch's shuffle is cut into spans of GROUP batches,
    each span sorted by length and dealt into batches, and the batches shuffled: rows of a
    batch have similar lengths, so little compute goes to padding (SST-2's random batches
    are 2.6x longer than their average row), and the order of lengths stays random.
    """

    GROUP = 64

    def __init__(self, n: int, batch_size: int, seed: int, lengths: list[int] | None = None):
        self.n, self.batch_size, self.seed, self.lengths = n, batch_size, seed, lengths
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            rng = random.Random(self.seed * 100_003 + epoch)
            perm = list(range(self.n))
            rng.shuffle(perm)
            if (lengths := self.lengths) is not None:
                B = self.batch_size
                lead = min(self.n, (-epoch * self.n) % B)  # finish the batch the last epoch began
                end = lead + (self.n - lead) // B * B  # whole batches; a partial one stays last
                batches = []
                for k in range(lead, end, self.GROUP * B):
                    chunk = sorted(perm[k : min(k + self.GROUP * B, end)], key=lambda i: lengths[i])
                    batches += [chunk[j : j + B] for j in range(0, len(chunk), B)]
                rng.shuffle(batches)
                perm = perm[:lead] + [i for b in batches for i in b] + perm[end:]
            self._perms = {epoch: perm}
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]


@dataclass
class MixedBatches:
    """Every tag's training rows in one pool; member k draws its own order over it.

    A batch is a function of (seed, step) alone, so a resumed run sees the batches an uninterrupted one sees.
    """

    pool: list[tuple[Task, int]]  # (task, row index)
    orders: list[BatchOrder]  # member k's data order over the pool

    @classmethod
    def of(cls, tasks: list[Task], run: TaskConfig) -> MixedBatches:
        pool = [(t, i) for t in tasks for i in range(len(t.train.ids))]
        lengths = [len(t.train.ids[i]) for t, i in pool] if run.group_by_length else None
        return cls(pool, [BatchOrder(len(pool), run.batch_size, run.seed + k, lengths) for k in range(run.ensemble)])

    def picks(self, step: int, rank: int, world: int) -> list[tuple[Task, int, int]]:
        """This process's share of the global batch at `step`: (task, row, member) triples."""
        return [(*self.pool[j], k) for k, order in enumerate(self.orders) for j in order.batch(step)][rank::world]

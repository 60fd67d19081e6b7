"""Which examples a training step sees: a pure function of (seed, step), for every task.

The trainer asks a batch source for ``batch(step, micro)``. Everything here is built so that the
answer depends on the step alone, never on what ran before:

* exact resume: a run resumed at step s draws exactly what a straight run drew at step s;
* gradient accumulation and DDP are the same as one large batch: the *global* batch of a step
  holds ``micro_batch x grad_accum x world`` example indices, laid out as
  ``[micro][rank][row]``, and micro-step m of rank r takes its own slice of it, before collating
  (so padding is per micro-batch, and ranks never see the same example).

Two ways to pick the indices of a global batch:

* ``epochs`` (default, finite datasets): example ``p = step * G + i`` of the whole stream is
  ``perm(epoch)[p % n]`` with ``epoch = p // n`` and a fresh seeded permutation per epoch, so
  every example is seen exactly once per epoch;
* ``random``: uniform draws with replacement (LM windows, where the "examples" are the
  ~millions of window starts of a token stream).
"""

from __future__ import annotations

from typing import Callable

import torch


class StepSampler:
    """Example indices of each (step, micro-step, rank) slice of a global batch."""

    def __init__(self, num_examples: int, micro_batch: int, grad_accum: int = 1, world: int = 1,
                 seed: int = 0, mode: str = "epochs"):
        if num_examples < 1:
            raise ValueError(f"num_examples: got {num_examples}, expected at least 1")
        if mode not in ("epochs", "random"):
            raise ValueError(f"mode: got {mode!r}, expected epochs or random")
        self.n, self.micro_batch, self.grad_accum, self.world = num_examples, micro_batch, grad_accum, world
        self.seed, self.mode = seed, mode
        self.global_batch = micro_batch * grad_accum * world
        self._perms: dict[int, torch.Tensor] = {}

    def generator(self, step: int) -> torch.Generator:
        """The step's own generator (also used by collate functions that draw, like MLM masks)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # a step spans at most two epochs: keep the cache small
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def global_indices(self, step: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """All example indices of step ``step``: (global_batch,). ``random`` mode draws from
        ``generator`` (default: the step's own), so a caller can keep drawing from it."""
        if self.mode == "random":
            g = generator if generator is not None else self.generator(step)
            return torch.randint(0, self.n, (self.global_batch,), generator=g)
        p = torch.arange(step * self.global_batch, (step + 1) * self.global_batch)  # stream positions
        epochs = p // self.n
        out = torch.empty_like(p)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[p[sel] % self.n]
        return out

    def slice_of(self, micro: int, rank: int) -> slice:
        """Where micro-step ``micro`` of rank ``rank`` sits in the global batch ([micro][rank][row])."""
        start = (micro * self.world + rank) * self.micro_batch
        return slice(start, start + self.micro_batch)

    def indices(self, step: int, micro: int, rank: int = 0) -> torch.Tensor:
        return self.global_indices(step)[self.slice_of(micro, rank)]

    def epoch_of(self, step: int) -> float:
        """How many passes over the data the run has made when step ``step`` starts."""
        return step * self.global_batch / self.n


class ExampleBatches:
    """The batch source of example tasks: ``collate(indices, generator) -> batch`` on this
    rank's slice of each step's global batch (padding per micro-batch)."""

    def __init__(self, sampler: StepSampler, collate: Callable[[list[int]], dict], rank: int = 0):
        self.sampler, self.collate, self.rank = sampler, collate, rank
        self._step, self._global = None, None

    def batch(self, step: int, micro: int) -> dict:
        if self._step != step:  # one draw per step, shared by its micro-steps
            self._global, self._step = self.sampler.global_indices(step), step
        return self.collate(self._global[self.sampler.slice_of(micro, self.rank)].tolist())

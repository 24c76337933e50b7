"""Cross-step caching: what to reuse on which denoising step, per CFG branch.

A DiT is called once per denoising step and CFG branch with a decreasing timestep. Between steps the
output of a range of blocks changes slowly, so a step may replace the range by ``input + residual``
(the residual ``output - input`` kept from a step that computed it) or reuse each block's attention
output. Policies (``CacheConfig.policy``):

- ``"block"``: MindIE SD's DiT block cache. Blocks ``[block_start, block_end)`` are computed on
  steps ``< step_start``, ``>= step_end`` and every ``step_interval``-th step in between; other
  steps reuse the range's residual.
- ``"attention"``: MindIE SD's attention cache. Same schedule; on non-compute steps the blocks in
  the range reuse their attention outputs (their q/k/v projections, norms and RoPE are not run).
- ``"dynamic"``: First-Block-Cache / TeaCache family. The first ``probe_blocks`` always run; the
  relative L1 change of their residual since the last computed step is accumulated, and the
  remaining blocks are skipped while the sum stays below ``threshold`` (at most ``max_skips``
  steps in a row). Under torch.distributed the metric is max-reduced so every rank decides alike.
- ``"forecast"``: TaylorSeer-style. The ``"block"`` schedule, but a skipped step extrapolates the
  residual to first order from the last two computed steps instead of reusing it unchanged.

State is kept per CFG branch (the k-th call with the same timestep is branch k); a timestep that
jumps up or a change of input shapes starts a new generation; ``StepCache.reset()`` does it by hand.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch

from ..options import OptionsError, from_mapping

POLICIES = ("none", "block", "attention", "dynamic", "forecast")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    policy: str = "none"
    step_start: int = 0
    step_interval: int = 2
    step_end: Optional[int] = None      # None: to the last step
    block_start: int = 0
    block_end: Optional[int] = None     # None: to the last block
    threshold: float = 0.1              # dynamic
    max_skips: int = 3                  # dynamic: consecutive skipped steps at most
    probe_blocks: int = 1               # dynamic: blocks always computed to measure the change

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise OptionsError(f"cache policy {self.policy!r} is unknown; valid policies: {POLICIES}")
        for name in ("step_start", "block_start", "max_skips"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise OptionsError(f"cache {name} must be an int >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.step_interval, int) or self.step_interval < 1:
            raise OptionsError(f"cache step_interval must be an int >= 1, got {self.step_interval!r}")
        if not isinstance(self.probe_blocks, int) or self.probe_blocks < 1:
            raise OptionsError(f"cache probe_blocks must be an int >= 1, got {self.probe_blocks!r}")
        if self.block_end is not None and self.block_end <= self.block_start:
            raise OptionsError(f"cache block_end ({self.block_end}) must be > block_start ({self.block_start})")
        if self.step_end is not None and self.step_end <= self.step_start:
            raise OptionsError(f"cache step_end ({self.step_end}) must be > step_start ({self.step_start})")
        if not self.threshold > 0:
            raise OptionsError(f"cache threshold must be > 0, got {self.threshold!r}")

    @classmethod
    def from_value(cls, value) -> "CacheConfig":
        if value is None:
            return cls()
        if isinstance(value, CacheConfig):
            return value
        if isinstance(value, StepCache):
            return value.config
        if not isinstance(value, dict):
            raise OptionsError(f"options['cache'] must be a dict, CacheConfig or StepCache, got {type(value).__name__}")
        return from_mapping(cls, value, "cache option")

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    def is_compute_step(self, step: int) -> bool:
        """Static schedules: does ``step`` compute the cached range?"""
        if step < self.step_start or (self.step_end is not None and step >= self.step_end):
            return True
        return (step - self.step_start) % self.step_interval == 0

    def block_range(self, n_blocks: int) -> range:
        end = n_blocks if self.block_end is None else self.block_end
        start = self.probe_blocks if self.policy == "dynamic" else self.block_start
        if end > n_blocks or start >= end:
            raise OptionsError(f"cache block range [{start}, {end}) does not fit the model's {n_blocks} blocks; "
                               f"choose block_start < block_end <= {n_blocks}")
        return range(start, end)


@dataclasses.dataclass
class BranchState:
    """What one CFG branch remembers between its steps."""
    residual: Optional[List[torch.Tensor]] = None       # of the cached block range, last computed step
    residual_step: int = -1
    prev_residual: Optional[List[torch.Tensor]] = None  # the computed step before that (forecast)
    prev_step: int = -1
    probe: Optional[List[torch.Tensor]] = None          # dynamic: probe blocks' residual at last compute
    accumulated: float = 0.0
    skips_in_row: int = 0
    attention: Dict[int, List[torch.Tensor]] = dataclasses.field(default_factory=dict)

    def tensors(self):
        for group in (self.residual, self.prev_residual, self.probe, *self.attention.values()):
            yield from group or ()


def timestep_position(graph: torch.fx.Graph) -> Optional[int]:
    """Position of the transformer's ``timestep`` among the graph's inputs (found by name), else None."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return next((i for i, n in enumerate(placeholders) if "timestep" in n.name), None)


def call_key(args, timestep_at: Optional[int]) -> tuple:
    """(timestep, input shapes) of one transformer call: what ``StepCache.begin_call`` tracks steps by."""
    t = args[timestep_at] if timestep_at is not None else None
    timestep = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else None
    return timestep, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))


class StepCache:
    """The runtime side of caching: step/branch tracking, per-branch state, statistics.

    Pass one as ``options={"cache": StepCache(CacheConfig(...))}`` to keep a handle (``reset()``,
    ``stats``, ``memory_bytes()``), or pass a dict/CacheConfig and let the backend make one.
    """

    def __init__(self, config: CacheConfig | dict | None = None, group=None):
        self.config = CacheConfig.from_value(config)
        self.group = group  # torch.distributed group whose ranks must agree (default: the world)
        self.runners = []   # the partition runners this cache drives (one per compiled graph)
        self.reset()

    def configure(self, config: "CacheConfig | dict") -> None:
        """Switch policy or schedule without recompiling; the state starts afresh."""
        self.config = CacheConfig.from_value(config)
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next call is step 0 of a new generation."""
        self.branches: Dict[int, BranchState] = {}
        self.step = -1
        self.branch = 0
        self._last_t: Optional[float] = None
        self._signature = None
        self.stats = {"calls": 0, "computed": 0, "skipped": 0, "generations": 0}
        self.changes: List[float] = []  # dynamic: the probe's relative change at each step (to pick a threshold)

    def begin_call(self, timestep: Optional[float], signature) -> BranchState:
        """Advance the step/branch counters for one transformer call and return the branch's state."""
        new_generation = self._last_t is None or signature != self._signature or (
            timestep is not None and self._last_t is not None and timestep > self._last_t)
        if new_generation:
            self.branches.clear()
            self.step, self.branch = 0, 0
            self.stats["generations"] += 1
        elif timestep is None or timestep != self._last_t:
            self.step, self.branch = self.step + 1, 0
        else:
            self.branch += 1
        self._last_t = timestep if timestep is not None else float(self.step)
        self._signature = signature
        self.stats["calls"] += 1
        return self.branches.setdefault(self.branch, BranchState())

    def agree(self, value: float) -> float:
        """Max of ``value`` over the ranks, so every rank takes the same skip decision."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([value], dtype=torch.float64)
            backend = torch.distributed.get_backend(self.group)
            if backend == "nccl":
                t = t.cuda()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
            return float(t.item())
        return value

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.branches.values() for t in s.tensors())

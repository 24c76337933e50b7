"""Run a partitioned model: compile each piece once per distinct structure, execute the pieces in
order, and let the cache policy replace block ranges (or their attention) on the steps it chooses.

The skip-or-run decision is taken here, between pieces, on the host: Dynamo sees one graph and
never recompiles, whatever the policy decides.
"""
from __future__ import annotations

import collections
import logging
import operator
from typing import Callable, Dict, List, Optional

import torch
from torch.fx import GraphModule, Node

from ..partition import Partition, Piece, structural_key
from ..report import Report
from .attention_reuse import attention_variants
from .cache import BranchState, StepCache, call_key, timestep_position
from .sequence_parallel import ShardPlan, gather_point, plan_sequence_parallel

log = logging.getLogger("mindiesd_compile")
# frozenset: inputs sharded over ranks; tuple: (tokens per rank, pad) of sequences padded to a multiple of the degree
Lower = Callable[[GraphModule, list, Report, frozenset, tuple], Callable]


class PieceCompiler:
    """Lowers pieces; structurally identical pieces (the repeated blocks) share one artifact."""

    def __init__(self, lower: Lower, report: Report):
        self.lower = lower
        self.report = report
        self.artifacts: Dict[tuple, tuple] = {}
        self.compiles = 0

    def __call__(self, gm: GraphModule, inputs: list, sharded: frozenset = frozenset(), count: bool = True,
                 pads: tuple = ()) -> Callable:
        """The compiled ``gm``; ``count``: add its rewrites to the model's report (not for cache variants)."""
        key = (structural_key(gm, inputs), sharded, pads)
        if key not in self.artifacts:
            piece_report = Report(self.report.patterns)
            self.artifacts[key] = (self.lower(gm, inputs, piece_report, sharded, pads), piece_report)
            self.compiles += 1
        fn, piece_report = self.artifacts[key]
        if count:
            self.report.merge(piece_report)  # sites are counted per use: the report describes the model
        return fn


class PartitionRunner:
    def __init__(self, partition: Partition, compiler: PieceCompiler, step_cache: Optional[StepCache],
                 sequence_parallel: Optional[dict] = None):
        self.partition = partition
        self.sequence_parallel = sequence_parallel  # {"degree", "group", "plan"}; planned on the first call
        self.shard_plan: Optional[ShardPlan] = None
        self.compiler = compiler
        self.step_cache = step_cache if step_cache is not None else StepCache()
        gm = partition.graph_module
        self.nodes = list(gm.graph.nodes)
        by_name = {p.name: p for p in partition.pieces}
        self.piece: Dict[Node, Piece] = {n: by_name[n.target] for n in self.nodes if n.op == "call_module"}
        self.block_nodes = [n for n in self.piece if self.piece[n].kind == "block"]
        self.block_index: Dict[Node, int] = {n: i for i, n in enumerate(self.block_nodes)}  # hot path: no list scans
        self.gather_point = next(n for n in self.piece if n.target == gather_point(partition))  # sequence parallel
        self.compiled: Dict[tuple, Callable] = {}  # (node, variant, sizes) -> compiled piece
        # cuda_graphs with a cache policy: wraps each compiled piece to replay it as a CUDA graph (cuda_graph.py)
        self.piece_graphs: Optional[Callable[[Callable], Callable]] = None
        # a graph Dynamo traced with dynamic sizes takes them as int inputs: its pieces compile once per set
        inputs = [n.meta.get("example_value", n.meta.get("val")) for n in self.nodes if n.op == "placeholder"]
        self.size_inputs = [i for i, v in enumerate(inputs) if isinstance(v, torch.SymInt)]
        self.sizes: tuple = ()
        self.n_attention: Dict[Node, int] = {}
        self.executions = collections.Counter()  # piece label (":reuse": cached attention) -> times run
        self.last_call: List[str] = []           # labels of the pieces the latest call ran
        self.calls = 0
        # Free each value after its last use, as one compiled graph would: otherwise every block's
        # output stays alive until the call returns (peak memory grows with the number of blocks).
        last_use: Dict[Node, Node] = {}
        for node in self.nodes:
            for arg in node.all_input_nodes:
                last_use[arg] = node
        self.release_after: Dict[Node, List[Node]] = collections.defaultdict(list)
        for value, user in last_use.items():
            self.release_after[user].append(value)
        self.timestep_index = timestep_position(gm.graph)
        self._planned_for = None  # the CacheConfig the range below was planned for
        self._plan()

    # --- planning -------------------------------------------------------------------------------
    def _plan(self) -> None:
        """(Re)plan the cached block range when the cache's config changed (StepCache.configure)."""
        cfg = self.step_cache.config
        if cfg is self._planned_for:
            return
        self.cached_range = cfg.block_range(len(self.block_nodes)) if cfg.enabled else None
        if cfg.enabled and cfg.policy != "attention":
            self._check_range(self.cached_range)
            if cfg.policy == "dynamic":
                self._check_range(range(0, self.cached_range.start))
        self._positions = self._probe_positions = None  # stream maps, learnt on the first computed step
        self._planned_for = cfg

    def _check_range(self, blocks: range) -> None:
        """Everything inside a cached range must be consumed inside it (but the last block's outputs)."""
        inside = {self.block_nodes[i] for i in blocks}
        for i in blocks[:-1]:
            for user in self.block_nodes[i].users:
                consumers = user.users if user.target is operator.getitem else [user]
                if any(c not in inside for c in consumers):
                    raise ValueError(f"block {i} feeds a node outside the cached block range {blocks.start}.."
                                     f"{blocks.stop - 1}; choose a range whose inner blocks feed only each other")

    def _range_interior(self, blocks: range) -> set:
        """Top-level nodes not evaluated when the range is skipped."""
        nodes = {self.block_nodes[i] for i in blocks}
        for i in blocks[:-1]:
            nodes |= set(self.block_nodes[i].users)
        return nodes

    def _stream_positions(self, blocks: range, inputs: list, outputs: list) -> List[int]:
        """For each output of the range's last block, the input of its first block on the same stream."""
        positions = []
        for k, out in enumerate(outputs):
            same = [p for p, t in enumerate(inputs) if isinstance(t, torch.Tensor)
                    and t.shape == out.shape and t.dtype == out.dtype]
            if len(same) != 1:
                same = [p for p in same if self._feeds(k, p)]
            if len(same) != 1:
                raise ValueError(f"cannot tell which input of block {blocks.start} carries output {k} of block "
                                 f"{blocks.stop - 1} (shape {tuple(out.shape)}); caching needs a residual stream")
            positions.append(same[0])
        return positions

    def _feeds(self, k: int, p: int) -> bool:
        """Does output k of a block become input p of the next (identical) block in the model?"""
        for j in range(1, len(self.block_nodes)):
            prev, node = self.block_nodes[j - 1], self.block_nodes[j]
            arg = node.args[p] if p < len(node.args) else None
            if isinstance(arg, Node) and arg.target is operator.getitem and arg.args == (prev, k):
                return True
        return False

    # --- execution ------------------------------------------------------------------------------
    def __call__(self, *args):
        self._plan()
        if self.sequence_parallel is not None:
            args = self._shard_model_inputs(args)
        self.sizes = tuple(args[i] for i in self.size_inputs)
        state = self._begin(args) if self.step_cache.config.enabled else None
        env: Dict[Node, object] = {}
        skipped: set = set()
        self.last_call = []
        placeholders = iter(args)
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = next(placeholders)
            elif node.op == "output":
                if not self.calls:
                    log.info("mindiesd_compile rewrites (whole model: %d pieces, %d compiled):\n%s",
                             len(self.piece), self.compiler.compiles, self.compiler.report.table())
                self.calls += 1
                if self.shard_plan is not None:  # the gather point's outputs may be the model's (Flux.2)
                    return torch.fx.map_arg(node.args[0], lambda a: self._gathered(a, env[a]))
                return torch.fx.map_arg(node.args[0], env.__getitem__)
            elif node in skipped:
                pass
            elif node.op == "call_function":
                env[node] = node.target(*torch.fx.map_arg(node.args, env.__getitem__))
                if self.shard_plan is not None and node in self.shard_plan.split_values:
                    env[node] = self.shard_plan.split(env[node], self.shard_plan.split_values[node], node.name)
            else:
                inputs = list(torch.fx.map_arg(node.args, env.__getitem__))
                if self.shard_plan is not None:
                    inputs = self._shard_piece_inputs(node, inputs)
                if state is not None and node in self.block_index:
                    env[node] = self._run_block(node, inputs, state, env, skipped)
                else:
                    env[node] = self._run_piece(node, inputs)
            for value in self.release_after.get(node, ()):
                env.pop(value, None)
        raise AssertionError("graph without output")

    def _run_piece(self, node: Node, inputs: list, variant: str = "plain", extra: list = ()):
        """Run one piece, compiling it on first use; variants "record"/"reuse" serve the attention cache."""
        pads = self.shard_plan.padded() if self.shard_plan is not None else ()
        key = (node, variant, self.sizes, pads)
        if key not in self.compiled:
            gm = getattr(self.partition.graph_module, node.target)
            if variant != "plain":
                record, reuse, self.n_attention[node] = attention_variants(gm)
                gm = record if variant == "record" else reuse
            sharded = frozenset()
            if self.shard_plan is not None and node in self.block_index:
                sharded = frozenset(self.shard_plan.sharded[self.block_index[node]])
            first = not any(k[:2] == (node, variant) for k in self.compiled)  # the report counts each site once
            fn = self.compiler(gm, inputs + list(extra), sharded, count=variant == "plain" and first,
                               pads=pads if sharded else ())
            self.compiled[key] = self.piece_graphs(fn) if self.piece_graphs is not None else fn
        label = self.piece[node].label + (":reuse" if variant == "reuse" else "")
        self.executions[label] += 1
        self.last_call.append(label)
        return self.compiled[key](*inputs, *extra)

    # --- sequence parallelism -----------------------------------------------------------------------
    def _shard_model_inputs(self, args):
        if self.shard_plan is None:
            sp = self.sequence_parallel
            self.shard_plan = plan_sequence_parallel(self.partition, args, sp["degree"], sp["group"], sp["plan"])
        return self.shard_plan.split_model_inputs(args)

    def _shard_piece_inputs(self, node: Node, inputs: list) -> list:
        """The blocks (and an epilogue cut at the gather module) run on this rank's tokens; after them, what
        leaves the gather point sharded is gathered, and token counts split for the blocks are whole again
        (see sequence_parallel.py)."""
        if node in self.block_index or node is self.gather_point:
            return self.shard_plan.block_inputs(node, inputs)
        return [self._gathered(a, t) for a, t in zip(node.args, inputs)]

    def _gathered(self, arg, value):
        plan = self.shard_plan
        if isinstance(arg, Node) and arg.target is operator.getitem and arg.args[0] is self.gather_point \
                and arg.args[1] in plan.gather:
            return plan.gather_dim(value, plan.gather[arg.args[1]])
        return plan.whole(arg, value)

    def _begin(self, args) -> BranchState:
        state = self.step_cache.begin_call(*call_key(args, self.timestep_index))
        self._call = {"skip": None, "inputs": {}}
        return state

    def _run_block(self, node: Node, inputs: list, state: BranchState, env: dict, skipped: set):
        cache, cfg = self.step_cache, self.step_cache.config
        index = self.block_index[node]
        blocks = self.cached_range
        if cfg.policy == "attention":
            return self._run_attention_block(node, index, inputs, state)
        if cfg.policy == "dynamic" and index == 0:
            self._call["inputs"]["probe"] = inputs
        if index == blocks.start:
            skip = self._decide(state)
            self._call["skip"] = skip
            if skip:
                last = self.block_nodes[blocks.stop - 1]
                streams = [inputs[p] for p in self._positions]
                residual = self._residual_now(state)
                outs = [x + r for x, r in zip(streams, residual)]
                skipped |= self._range_interior(blocks) - {node}
                env[last] = tuple(outs)
                cache.stats["skipped"] += 1
                state.skips_in_row += 1
                return env[last]
            self._call["inputs"]["range"] = inputs
        out = self._run_piece(node, inputs)
        if cfg.policy == "dynamic" and index == blocks.start - 1:
            self._measure_probe(state, list(out))
        if index == blocks.stop - 1 and self._call["skip"] is False:
            self._store_residual(state, list(out))
        return out

    def _decide(self, state: BranchState) -> bool:
        """True: skip the cached range on this call."""
        cfg, step = self.step_cache.config, self.step_cache.step
        if state.residual is None:
            return False
        if cfg.policy in ("block", "forecast"):
            return not cfg.is_compute_step(step)
        # dynamic: decided after the probe blocks ran (_measure_probe)
        return self._call.get("dynamic_skip", False)

    def _measure_probe(self, state: BranchState, outs: list) -> None:
        cfg, cache = self.step_cache.config, self.step_cache
        probe_range = range(0, self.cached_range.start)
        inputs = self._call["inputs"]["probe"]
        if self._probe_positions is None:
            self._probe_positions = self._stream_positions(probe_range, inputs, outs)
        residual = [o - inputs[p] for o, p in zip(outs, self._probe_positions)]
        skip = False
        if state.probe is not None and cache.step >= cfg.step_start:
            change = sum(float((r - q).abs().float().mean()) for r, q in zip(residual, state.probe))
            scale = sum(float(q.abs().float().mean()) for q in state.probe)
            change = cache.agree(change / max(scale, 1e-12))
            cache.changes.append(change)
            skip = state.accumulated + change < cfg.threshold and state.skips_in_row < cfg.max_skips
            state.accumulated = state.accumulated + change if skip else 0.0
        if not skip:
            state.probe = residual
        self._call["dynamic_skip"] = skip

    def _residual_now(self, state: BranchState) -> List[torch.Tensor]:
        if self.step_cache.config.policy != "forecast" or state.prev_residual is None:
            return state.residual
        step = self.step_cache.step
        slope = (step - state.residual_step) / (state.residual_step - state.prev_step)
        return [r + (r - q) * slope for r, q in zip(state.residual, state.prev_residual)]

    def _store_residual(self, state: BranchState, outs: list) -> None:
        inputs = self._call["inputs"]["range"]
        if self._positions is None:
            self._positions = self._stream_positions(self.cached_range, inputs, outs)
        residual = [o - inputs[p] for o, p in zip(outs, self._positions)]
        if self.step_cache.config.policy == "forecast":
            state.prev_residual, state.prev_step = state.residual, state.residual_step
        state.residual, state.residual_step = residual, self.step_cache.step
        state.skips_in_row = 0
        self.step_cache.stats["computed"] += 1

    def _run_attention_block(self, node: Node, index: int, inputs: list, state: BranchState):
        cfg, cache = self.step_cache.config, self.step_cache
        if index not in self.cached_range:
            return self._run_piece(node, inputs)
        first = index == self.cached_range.start
        if cfg.is_compute_step(cache.step) or index not in state.attention:
            outs = list(self._run_piece(node, inputs, "record"))
            n_out = len(outs) - self.n_attention[node]
            state.attention[index] = outs[n_out:]
            outs = outs[:n_out]
            cache.stats["computed"] += first
        else:
            outs = list(self._run_piece(node, inputs, "reuse", state.attention[index]))
            cache.stats["skipped"] += first
        return tuple(outs)

"""The ``torch.compile`` backend "mindiesd" (registered through the ``torch_dynamo_backends`` entry point).

Dynamo graph -> partition at the repeated blocks -> per piece: AOT (functionalised ATen, inference)
-> PassManager -> target lowering; the partition runner executes the pieces (caching, parallelism).
A graph without repeated blocks is lowered whole.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .options import CompileOptions, OptionsError
from .partition import partition_at_blocks
from .passes import PASSES, PassManager
from .passes.sparse_attention import resolve_video_grid, with_sparse_runtime
from .report import Report
from .runtime.cache import StepCache
from .runtime.cuda_graph import replay_as_graphs
from .runtime.host_copies import HostCopies, hoist_host_copies, on_devices
from .runtime.runner import PartitionRunner, PieceCompiler

log = logging.getLogger("mindiesd_compile")


def infer_target(example_inputs) -> str:
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    return next((d for d in ("npu", "cuda") if d in devices), "cpu")


def _exchanges_start_early(options: CompileOptions, target: str, sharded: frozenset) -> bool:
    """Whether this piece's attention gathers keys/values by ``all_gather_peers``, started early (gather_kv with
    an overlap): what ``StartExchangesEarly`` and its Inductor setting are for."""
    return bool(sharded) and options.sequence_parallel_exchange(target) == "gather_kv" and \
        bool(options.sequence_parallel_overlap_for(target))


def build_manager(options: CompileOptions, target: str, report: Report, sharded: frozenset = frozenset(),
                  offline: bool = False, pads: tuple = ()) -> PassManager:
    """``sharded``: the piece's inputs that carry this rank's tokens; ``pads``: (tokens per rank, pad) of the
    sequences padded to a multiple of the degree (runtime/sequence_parallel.py)."""
    passes = [PASSES[name](report) for name in options.patterns if name in PASSES]
    if sharded:  # this piece sees a slice of the sequence: all-to-all around its attention
        from .passes.ulysses import UlyssesPass
        group = options.parallel_group or torch.distributed.group.WORLD
        passes.insert(passes.index(next(p for p in passes if p.name == "attention")) + 1,
                      UlyssesPass(report, options.sequence_parallel, group.group_name, sorted(sharded),
                                  options.sequence_parallel_exchange(target),
                                  options.sequence_parallel_overlap_for(target), pads))
    if target == "cuda" and "norm_rope" in options.patterns and not offline:  # a Triton kernel: CUDA only
        from .lowering.norm_rope import NormRopeIntoOne
        passes.append(NormRopeIntoOne(report))
    if target in ("cuda", "cpu"):
        from .lowering.decompose import INDUCTOR_FUSES, DecomposeForInductor
        passes.append(DecomposeForInductor(report, INDUCTOR_FUSES | {"attention"} if offline else INDUCTOR_FUSES))
    if options.fp8.linear and not offline and target != "npu":  # before the GELU epilogue: FP8 GEMMs win
        from .lowering.fp8_linear import LinearToFp8
        passes.append(LinearToFp8(report))
    if target == "cuda" and "gelu_epilogue" in options.patterns and not offline:  # cuBLASLt epilogue: CUDA only
        from .lowering.gelu_epilogue import GeluIntoGemm
        passes.append(GeluIntoGemm(report))
    if target == "npu":
        from .lowering.legalize_npu import LegalizeForNpu
        passes.append(LegalizeForNpu(report))
    # Sparse attention: not in offline packages (ATen only), not on NPU (no block-sparse kernel there yet).
    if options.sparse_attention is not None and not offline and target != "npu":
        from .passes.sparse_attention import SparseAttentionPass
        passes.append(SparseAttentionPass(report, options.sparse_attention))
    if options.fp8.attention and not offline and target != "npu":  # last: after every pass that reads attention
        from .lowering.fp8_attention import AttentionToFp8
        passes.append(AttentionToFp8(report))
    if _exchanges_start_early(options, target, sharded):  # last: the passes above re-place the nodes they rewrite
        from .passes.early_exchange import StartExchangesEarly
        passes.append(StartExchangesEarly(report))
    key = repr((target, options.patterns, options.strict, offline, options.fp8))  # what changes the compiled code
    return PassManager(passes, report, strict=options.strict, dump_graphs=options.dump_graphs, config_key=key)


def lower(gm: torch.fx.GraphModule, example_inputs, options: CompileOptions, target: str, report: Report,
          mode: Optional[str] = None, sharded: frozenset = frozenset(), pads: tuple = ()):
    """One graph through the passes and the target's lowering."""
    manager = build_manager(options, target, report, sharded, pads=pads)
    if target == "eager":
        from .lowering.eager import compile_eager
        return compile_eager(gm, example_inputs, manager)
    if target == "npu":
        from .lowering.torchair import compile_npu
        return compile_npu(gm, example_inputs, manager, options.npu)
    from .lowering.inductor import compile_inductor
    config = dict(options.inductor_config)
    if _exchanges_start_early(options, target, sharded):
        # Inductor's peak-memory reordering put the query GEMM back before the exchange started ahead of it
        # (passes/early_exchange.py), its control_deps notwithstanding (torch 2.11, H200s): the graph order stands
        config.setdefault("reorder_for_peak_memory", False)
    compiled = compile_inductor(gm, example_inputs, manager, config, mode)
    if not manager.graph_id:  # Inductor found the graph in its cache: the passes never ran
        report.cache_hits += 1
    return compiled


def mindiesd_backend(gm: torch.fx.GraphModule, example_inputs, options=None, mode: Optional[str] = None,
                     report: Optional[Report] = None):
    opts = CompileOptions.from_dict(options)  # bad options fail here, before any tracing work
    opts = resolve_video_grid(opts, gm)  # sparse attention: the grid is in the prologue, not in the blocks
    target = opts.target or infer_target(example_inputs)
    opts.fp8.check_target(target)  # the target may come from the inputs' device
    opts.check_cuda_graphs_target(target)
    moved = hoist_host_copies(gm)  # CPU tables the forward copies to the device: copied once, outside
    example_inputs = on_devices(example_inputs, moved)
    compiled = _compile(gm, example_inputs, opts, target, mode, report)
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.device.type == "cuda"), None)
    graphs = opts.cuda_graphs_for(target, _inductor_graphs(opts, mode)) if device is not None else False
    if graphs:
        group = (opts.parallel_group or torch.distributed.group.WORLD) if opts.sequence_parallel > 1 else None
        compiled = replay_as_graphs(compiled, device, group, auto=graphs == "auto", per_piece=opts.caching)
    return HostCopies(compiled, moved) if moved else compiled


def _inductor_graphs(opts: CompileOptions, mode: Optional[str]) -> bool:
    """Whether Inductor captures graphs of its own (torch.compile's mode "reduce-overhead" or "max-autotune"):
    ours would capture around theirs."""
    from torch._inductor import list_mode_options
    config = dict(list_mode_options(mode)) if mode else {}
    config.update(opts.inductor_config)
    return bool(config.get("triton.cudagraphs"))


def _compile(gm, example_inputs, opts: CompileOptions, target: str, mode, report):
    if target == "npu":
        from .lowering.torchair import import_torchair
        import_torchair()  # no torch_npu: say what to install before any piece is compiled
    report = report if report is not None else Report(opts.patterns)
    step_cache = opts.cache if isinstance(opts.cache, StepCache) else StepCache(opts.cache)
    log.debug("mindiesd_compile: target=%s patterns=%s cache=%s", target, opts.patterns, step_cache.config)
    partition = partition_at_blocks(gm) if opts.partition else None
    if partition is None:
        if opts.sequence_parallel > 1:
            raise OptionsError("options['sequence_parallel'] needs repeated transformer blocks, and this graph has none")
        if step_cache.config.enabled:
            raise OptionsError("options['cache'] needs repeated transformer blocks (an nn.ModuleList of blocks "
                               "on the model), and this graph has none")
        return with_sparse_runtime(lower(gm, example_inputs, opts, target, report, mode), gm, opts)
    compiler = PieceCompiler(lambda piece, inputs, piece_report, sharded, pads: lower(
        piece, inputs, opts, target, piece_report, mode, sharded, pads), report)
    sequence_parallel = None
    if opts.sequence_parallel > 1:
        from .runtime.sequence_parallel import find_cp_plan, gather_modules
        plan = opts.parallel_plan or find_cp_plan(partition)
        partition = partition_at_blocks(gm, gather_modules(plan))  # the epilogue ends where the plan gathers
        sequence_parallel = {"degree": opts.sequence_parallel, "group": opts.parallel_group, "plan": plan}
    runner = PartitionRunner(partition, compiler, step_cache, sequence_parallel)
    step_cache.runners.append(runner)
    return with_sparse_runtime(runner, gm, opts)

"""``options={...}`` of ``torch.compile(..., backend="mindiesd")``, validated before any work starts."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

TARGETS = ("cuda", "cpu", "eager", "npu")
SEQUENCE_PARALLEL_MODES = ("auto", "ulysses", "gather_kv")
# Patterns in the order the PassManager runs them (later patterns build on earlier rewrites); the last are
# target lowerings (lowering/), run where the target has the kernel.
PATTERNS = ("cleanup", "attention", "rope", "rms_norm", "layer_norm", "adaln", "gated_residual", "norm_rope",
            "gelu_epilogue")


class OptionsError(ValueError):
    """A bad ``options`` key or value; the message names the valid ones."""


def from_mapping(cls, mapping: Mapping[str, Any], what: str):
    """``cls(**mapping)``, refusing keys that are not fields of the dataclass ``cls``."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(mapping) - set(valid))
    if unknown:
        raise OptionsError(f"unknown {what}(s) {unknown}; valid {what}s: {valid}")
    return cls(**mapping)


def _inductor_patches(patches) -> Tuple[Tuple[str, Any], ...]:
    """``options["inductor_config"]`` as sorted (key, value) pairs. A key Inductor does not have would fail only
    once the first piece compiles, after Dynamo's trace: refused here instead, with the nearest keys."""
    import difflib
    import torch._inductor.config
    try:
        patches = dict(patches)  # a mapping, or (key, value) pairs (a copy of these options)
    except (TypeError, ValueError):
        raise OptionsError("options['inductor_config'] must be a dict of torch._inductor.config keys, "
                           f"got {patches!r}") from None
    if not patches:
        return ()
    known = torch._inductor.config.get_config_copy()
    for key in patches:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=3)
            raise OptionsError(f"options['inductor_config'] key {key!r} is not an Inductor config"
                               + (f"; did you mean {near}?" if near else " (see torch/_inductor/config.py)"))
    return tuple(sorted(patches.items()))


NPU_MODES = ("max-autotune", "reduce-overhead", "npugraph_ex")
GRAPH_DUMP_TYPES = ("pbtxt", "txt", "py")


@dataclasses.dataclass(frozen=True)
class NpuConfig:
    """What target "npu" passes on to torchair's ``CompilerConfig``.

    mode:             "max-autotune": one GE graph per piece (GE fuses and schedules it); "reduce-overhead"
                      or "npugraph_ex": the FX graph runs op by op under aclgraph capture.
    frozen_parameter: weights are constant across calls (inference): GE may keep them in its own formats.
    graph_dump:       folder for torchair's dump of every GE graph (None: no dump); ``graph_dump_type`` its format.
    run_eagerly:      debug: convert to GE, then run the converted FX graph op by op instead of GE.
    """

    mode: str = "max-autotune"
    frozen_parameter: bool = False
    graph_dump: Optional[str] = None
    graph_dump_type: str = "pbtxt"
    run_eagerly: bool = False

    def __post_init__(self):
        if self.mode not in NPU_MODES:
            raise OptionsError(f"options['npu']['mode']={self.mode!r} is not a torchair mode; valid modes: {NPU_MODES}")
        if self.graph_dump_type not in GRAPH_DUMP_TYPES:
            raise OptionsError(f"options['npu']['graph_dump_type']={self.graph_dump_type!r}; valid: {GRAPH_DUMP_TYPES}")
        for flag in ("frozen_parameter", "run_eagerly"):
            if not isinstance(getattr(self, flag), bool):
                raise OptionsError(f"options['npu']['{flag}'] must be True or False, got {getattr(self, flag)!r}")
        if self.graph_dump is not None and not isinstance(self.graph_dump, str):
            raise OptionsError(f"options['npu']['graph_dump'] must be a directory path (str), got {self.graph_dump!r}")


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """Opt-in FP8, never on by default (``options["fp8"]``).

    attention: q, k, v in float8_e4m3fn with per-(batch, head) scales through FlashAttention-3's FP8 kernel
               (Hopper); where that kernel does not apply, CUDA runs bf16 attention and the CPU simulates the
               rounding (ops/fp8_attention.py). Sites with a mask stay bf16.
    linear:    W8A8 linear layers of a bf16 model: weights per output channel, activations per token, through
               ``torch._scaled_mm`` (sm89+); elsewhere bf16 (CUDA) or simulated (CPU) (ops/fp8_linear.py).
    """

    attention: bool = False
    linear: bool = False

    def __post_init__(self):
        for flag in ("attention", "linear"):
            if not isinstance(getattr(self, flag), bool):
                raise OptionsError(f"options['fp8']['{flag}'] must be True or False, got {getattr(self, flag)!r}")

    def check_target(self, target: Optional[str]) -> None:
        if target == "npu" and self != Fp8Config():
            raise OptionsError("options['fp8'] has no NPU kernels here (FA3's FP8 attention and torch._scaled_mm "
                               "are CUDA's); remove it for an NPU model")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Typed compile options.

    target:    "cuda" | "cpu" (Inductor), "eager" (passes only, graph run op by op), "npu" (torchair -> GE).
               None: the device of the graph's tensors.
    patterns:  which rewrites run (default: all of PATTERNS).
    strict:    raise when a pass fails instead of falling back to the unrewritten graph.
    dump_graphs: directory to write the graph before/after each pass (None: no dumps).
    inductor_config: extra Inductor config patches (target cuda/cpu only).
    partition: split the graph at its repeated blocks and compile identical blocks once.
    cache:     cross-step caching: a dict of ``CacheConfig`` fields, a ``CacheConfig``, or a ``StepCache``
               (keep the latter to reset it or read its statistics). Needs ``partition``.
    sequence_parallel: ranks sharing one sequence (each gets a slice of the tokens); needs torch.distributed
               initialised.
    sequence_parallel_mode: how attention sees the whole sequence: "ulysses" (all-to-all: every token, this
               rank's heads), "gather_kv" (keys and values all-gathered: this rank's queries, every head) or
               "auto" (``sequence_parallel_exchange`` says which runs).
    sequence_parallel_overlap: how gather_kv hides its exchange behind compute (CUDA: copy engines; not on the
               NPU nor with FP8 attention): "ahead" starts the keys' and the values' exchange each as soon as
               its projection is done, before the projections still to come, which run beside it;
               "split" also attends to this rank's own keys while the others arrive, then to theirs, merging the
               two by their log-sum-exp (not with a mask); "auto" or True: "ahead" on 2 ranks, "split" on more
               (``sequence_parallel_overlap_for``); False: NCCL, awaited before attention.
    parallel_plan: where the sequence is split/gathered, in diffusers' ``_cp_plan`` format
               (default: the model class's own ``_cp_plan``).
    parallel_group: the torch.distributed group of the sequence-parallel ranks (default: the world).
    sparse_attention: block-sparse self-attention over video tokens: a dict of ``SparseAttentionConfig``
               fields (sparse/config.py), e.g. ``{"sparsity": 0.8}``; None: dense.
    npu:       torchair choices for target "npu": a dict of ``NpuConfig`` fields.
    fp8:       opt-in FP8: a dict of ``Fp8Config`` fields, e.g. ``{"attention": True}``.
    cuda_graphs: replay the compiled forward as one CUDA graph per input signature (target cuda; not with
               sparse attention; with sequence parallelism only over the copy-engine exchange, gather_kv with an
               overlap: the default on 2-4 ranks). Pays where launches bound a forward (small resolutions;
               Qwen-Image on 4 GPUs); runtime/cuda_graph.py says how inputs and outputs are handled. True: capture
               every signature; "auto" (default): where a capture is possible, try it on forwards the host
               bounds and keep the graphs measured faster (``cuda_graphs_for``); False: never. With ``cache`` (a
               policy, or a StepCache handle: ``caching``) each piece (block) is captured, or tried, on its own
               instead, and the policy picks the pieces on the host.
    """

    target: Optional[str] = None
    patterns: Tuple[str, ...] = PATTERNS
    strict: bool = False
    dump_graphs: Optional[str] = None
    inductor_config: Tuple[Tuple[str, Any], ...] = ()
    partition: bool = True
    cache: Any = None
    sequence_parallel: int = 1
    sequence_parallel_mode: str = "auto"
    sequence_parallel_overlap: Any = "auto"
    parallel_plan: Any = None
    parallel_group: Any = None
    sparse_attention: Any = None
    npu: Any = None
    fp8: Any = None
    cuda_graphs: Any = "auto"

    def __post_init__(self):
        if self.target is not None and self.target not in TARGETS:
            raise OptionsError(f"options['target']={self.target!r} is not a target; valid targets: {TARGETS}")
        if isinstance(self.npu, NpuConfig) or self.npu is None:
            object.__setattr__(self, "npu", self.npu or NpuConfig())
        elif isinstance(self.npu, Mapping):
            object.__setattr__(self, "npu", from_mapping(NpuConfig, self.npu, "options['npu'] key"))
        else:
            raise OptionsError(f"options['npu'] must be a dict of NpuConfig fields, got {type(self.npu).__name__}")
        if not isinstance(self.fp8, Fp8Config):
            if self.fp8 is not None and not isinstance(self.fp8, Mapping):
                raise OptionsError(f"options['fp8'] must be a dict of Fp8Config fields, got {type(self.fp8).__name__}")
            object.__setattr__(self, "fp8", from_mapping(Fp8Config, self.fp8 or {}, "options['fp8'] key"))
        self.fp8.check_target(self.target)
        if self.npu != NpuConfig() and self.target not in (None, "npu"):
            raise OptionsError(f"options['npu'] configures target 'npu', but options['target']={self.target!r}")
        patterns = (self.patterns,) if isinstance(self.patterns, str) else tuple(self.patterns)
        unknown = [p for p in patterns if p not in PATTERNS]
        if unknown:
            raise OptionsError(f"options['patterns'] has unknown pattern(s) {unknown}; valid patterns: {PATTERNS}")
        object.__setattr__(self, "patterns", tuple(p for p in PATTERNS if p in patterns))
        if not isinstance(self.strict, bool):
            raise OptionsError(f"options['strict'] must be True or False, got {self.strict!r}")
        if self.dump_graphs is not None and not isinstance(self.dump_graphs, str):
            raise OptionsError(f"options['dump_graphs'] must be a directory path (str) or None, got {self.dump_graphs!r}")
        object.__setattr__(self, "inductor_config", _inductor_patches(self.inductor_config))
        if not isinstance(self.partition, bool):
            raise OptionsError(f"options['partition'] must be True or False, got {self.partition!r}")
        from .runtime.cache import CacheConfig, StepCache
        if not isinstance(self.cache, StepCache):
            object.__setattr__(self, "cache", CacheConfig.from_value(self.cache))
        if CacheConfig.from_value(self.cache).enabled:  # a StepCache gives its config
            if not self.partition:
                raise OptionsError("options['cache'] needs options['partition']=True: caching skips whole blocks")
        if not isinstance(self.sequence_parallel, int) or self.sequence_parallel < 1:
            raise OptionsError(f"options['sequence_parallel'] must be an int >= 1, got {self.sequence_parallel!r}")
        if self.sequence_parallel_mode not in SEQUENCE_PARALLEL_MODES:
            raise OptionsError(f"options['sequence_parallel_mode']={self.sequence_parallel_mode!r} is not a mode; "
                               f"valid modes: {SEQUENCE_PARALLEL_MODES}")
        overlap = self.sequence_parallel_overlap
        if not (isinstance(overlap, bool) or overlap in ("auto", "ahead", "split")):
            raise OptionsError("options['sequence_parallel_overlap'] must be 'auto', 'ahead', 'split', True (= 'auto') "
                               f"or False, got {overlap!r}")
        if self.sequence_parallel > 1:
            if not self.partition:
                raise OptionsError("options['sequence_parallel'] needs options['partition']=True")
            if "attention" not in patterns:
                raise OptionsError("options['sequence_parallel'] needs the 'attention' pattern: it shards attention")
            import torch.distributed as dist
            if not (dist.is_available() and dist.is_initialized()):
                raise OptionsError("options['sequence_parallel'] needs torch.distributed initialised first "
                                   "(torch.distributed.init_process_group; launch with torchrun)")

        from .sparse.config import SparseAttentionConfig  # sparse attention: validated in its own module
        object.__setattr__(self, "sparse_attention", SparseAttentionConfig.from_value(self.sparse_attention))
        if self.sparse_attention is not None:
            self.sparse_attention.check(self)
            if self.sequence_parallel > 1 and self.sequence_parallel_mode == "gather_kv":
                raise OptionsError("options['sparse_attention'] selects blocks per head over the whole sequence, which "
                                   "sequence_parallel_mode 'gather_kv' does not give a rank (its own queries only); "
                                   "use sequence_parallel_mode 'ulysses' with sparse attention")
        if not (isinstance(self.cuda_graphs, bool) or self.cuda_graphs == "auto"):
            raise OptionsError(f"options['cuda_graphs'] must be True, False or 'auto', got {self.cuda_graphs!r}")
        self.check_cuda_graphs_target(self.target)
        if self.cuda_graphs is True and self.sparse_attention is not None:
            raise OptionsError("options['cuda_graphs'] captures the forward, but with options['sparse_attention'] "
                               "what runs changes from step to step (or is not graph-safe yet); drop one of them")

    def sequence_parallel_exchange(self, target: Optional[str]) -> str:
        """The mode that runs, for ``target``. "auto": gather_kv on 2 ranks, where it moves the same bytes as
        Ulysses with nothing exchanged after attention and no layout copies (0.4-1.6 % faster on 2 H200s without
        overlap, bench/RESULTS.md 2026-11-27), and on 3-4 ranks where its exchange is overlapped on CUDA (2-5 %
        faster than Ulysses on 4 H200s, 5 % on 3; with "ahead", masked attention's overlap, 1.8 %; without the
        overlap 2.4 % slower: the gathered keys and values grow with the degree); Ulysses on more ranks (not
        timed), with sparse attention, and on the NPU, where neither has been timed (gather_kv lowers there too, to
        HcomAllGather: ask for it by name)."""
        if self.sequence_parallel_mode != "auto":
            return self.sequence_parallel_mode
        if self.sparse_attention is not None or target == "npu":
            return "ulysses"
        overlapped = target == "cuda" and self.sequence_parallel_overlap_for(target)
        return "gather_kv" if self.sequence_parallel == 2 or (self.sequence_parallel <= 4 and overlapped) \
            else "ulysses"

    def sequence_parallel_overlap_for(self, target: Optional[str]) -> Any:
        """The gather_kv overlap that runs (False, "ahead" or "split"): none on the NPU (torchair lowers no
        copy-engine exchange) nor with FP8 attention (not timed; the split attention has no FP8 kernel). "auto":
        "ahead" on 2 ranks, where the exchange fits beside the projections (Wan2.1 on 2 H200s: 14B 2.2 %, 1.3B
        2.5 % faster than waiting for NCCL; "split" 0.5-1.1 % slower than "ahead"), "split" on more, where a
        rank receives more in less projection time (4 H200s: 1.3B 2.6 % faster than "ahead", 3.8 % under
        cuda_graphs; 14B even; bench/RESULTS.md 2026-11-27)."""
        overlap = self.sequence_parallel_overlap
        if target == "npu" or self.fp8.attention or overlap is False:
            return False
        if overlap is True or overlap == "auto":
            return "ahead" if self.sequence_parallel == 2 else "split"
        return overlap

    @property
    def caching(self) -> bool:
        """Whether a cache policy may pick the pieces each step: one is set, or a ``StepCache`` handle is given,
        whose ``configure()`` may set one after the compile."""
        from .runtime.cache import CacheConfig, StepCache
        return isinstance(self.cache, StepCache) or CacheConfig.from_value(self.cache).enabled

    def _graph_safe_exchange(self) -> bool:
        """No NCCL kernel in a captured sequence-parallel forward (pytorch/pytorch#115388): gather_kv with an
        overlap exchanges over copy engines only, and so does the output gather then."""
        return self.sequence_parallel == 1 or (self.sequence_parallel_exchange("cuda") == "gather_kv" and
                                               bool(self.sequence_parallel_overlap_for("cuda")))

    def cuda_graphs_for(self, target: str, inductor_graphs: bool) -> Any:
        """What runs for ``target``: True, "auto" or False. "auto" is off where a capture cannot be: another target,
        sparse attention (what runs changes per step), an exchange over NCCL, and Inductor's own CUDA graphs
        (``inductor_graphs``: torch.compile's mode "reduce-overhead", or ``triton.cudagraphs``). With a cache
        policy it applies to each piece (runtime/cuda_graph.py, ``replay_as_graphs``)."""
        if self.cuda_graphs != "auto":
            return self.cuda_graphs
        possible = target == "cuda" and self.sparse_attention is None and self._graph_safe_exchange() \
            and not inductor_graphs
        return "auto" if possible else False

    def check_cuda_graphs_target(self, target: Optional[str]) -> None:
        """Here with the target asked for, in the backend with the one the inputs' device gave (True only: "auto"
        steps aside, ``cuda_graphs_for``)."""
        if self.cuda_graphs is True and target not in (None, "cuda"):
            raise OptionsError(f"options['cuda_graphs'] needs target 'cuda', not {target!r}: it replays CUDA graphs "
                               "(target 'cuda' only); remove it, or run the model on a CUDA device")
        if self.cuda_graphs is True and not self._graph_safe_exchange():
            raise OptionsError("options['cuda_graphs'] with sequence_parallel needs the copy-engine exchange "
                               "(sequence_parallel_mode 'gather_kv' with sequence_parallel_overlap 'auto', 'ahead' or "
                               "'split', no FP8 attention): a CUDA graph holding NCCL kernels hangs the process group's "
                               "teardown (pytorch/pytorch#115388); set those, or drop cuda_graphs")

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]]) -> "CompileOptions":
        if options is None:
            return cls()
        if isinstance(options, CompileOptions):
            return options
        if not isinstance(options, Mapping):
            raise OptionsError(f"options must be a dict or CompileOptions, got {type(options).__name__}")
        return from_mapping(cls, options, "option")

    def with_target(self, target: str) -> "CompileOptions":
        return dataclasses.replace(self, target=target)

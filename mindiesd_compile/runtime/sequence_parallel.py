"""Where the sequence is split across ranks and where it is gathered again, from diffusers' ``_cp_plan``.

The plan (``{module: {input: ContextParallelInput}, module: ContextParallelOutput}``, the format
diffusers ships on Wan, Flux, Qwen-Image, LTX, ...) is mapped onto the partition:

- ``""`` entries name the model's own inputs: they are split before the prologue runs;
- other split entries (Wan's ``rope`` outputs, ``blocks.0``'s ``hidden_states``) name values that enter
  the first block: they are split where the prologue hands them over, for every block that reads them;
- the epilogue runs on each rank's tokens up to the module where the plan gathers (``proj_out``), and what
  comes out of it sharded is gathered there (the epilogue need not be token-wise: Flux.2 drops the text from its
  joint sequence by count); a plan that names no such module gets the last block's output gathered;
- a token count (or a size it is a multiple of) that the prologue hands to the blocks as a number (a
  graph traced with dynamic sequence dims reshapes and slices by it) is divided like the tokens.

A sequence the degree does not divide is padded at its end (zeros) to the next multiple: the last rank's
chunk ends with the pad, every attention leaves those keys out (passes/ulysses.py, which tells the split
sequences apart by their tokens per rank: two that have as many but different pads are an error), and the
gather drops their rows. Not where the blocks rebuild the token count from a number (above), nor with attention
masks. A cache policy's change metric (each rank's, the largest taken) counts the last rank's pad rows.

Models without a ``_cp_plan`` may have a built-in one (``parallel_plans.py``: HunyuanVideo, SD3).

Which block inputs end up sharded, and along which dim, is found by running the partition on fake
tensors twice (full and split inputs) and comparing shapes: no per-model code.
"""
from __future__ import annotations

import dataclasses
import operator
import sys
from typing import Dict, FrozenSet, Optional, Tuple

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from ..options import OptionsError
from ..partition import Partition, ancestors, in_module, module_path
from .parallel_plans import builtin_applies, builtin_plan


@dataclasses.dataclass(frozen=True)
class MaskSplit:
    """How a mask over the whole joint sequence reaches a rank: padded along ``dim`` by ``pad`` and chunked,
    so that it is as long as the rank's joint sequence (split image tokens, whole text: the pad is
    (degree - 1) x text length, the same at every resolution); the Ulysses pass all-gathers it back and
    drops the pad (whatever the order of the joint sequence)."""
    dim: int
    pad: int


def _local(x, spec, degree: int, rank: int):
    """Rank ``rank``'s part of ``x``: a chunk along dim ``spec`` (the dim padded to a multiple of the degree
    first), a token count (None), or a MaskSplit."""
    if spec is None:
        return x // degree
    if isinstance(spec, MaskSplit):
        x, spec = _padded(x, spec.dim, spec.pad), spec.dim
    else:
        x = _padded(x, spec, padding(x.shape[spec], degree))
    return x.chunk(degree, spec)[rank].contiguous()


def padding(tokens: int, degree: int) -> int:
    """Tokens to append to make ``tokens`` a multiple of ``degree``."""
    return -tokens % degree


def _padded(x: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    if not pad:
        return x
    return torch.cat([x, x.new_zeros(x.shape[:dim] + (pad,) + x.shape[dim + 1:])], dim)


def check_divisible(model: str, what: str, tokens: int, degree: int, why: str = "") -> None:
    """``why``: why the tokens cannot be padded instead, said after the count."""
    if tokens % degree:
        fits = [d for d in range(2, 9) if tokens % d == 0]  # the degrees one host's GPUs could give instead
        which = f"sequence_parallel={', '.join(map(str, fits))} would" if fits else "no degree from 2 to 8 would"
        raise OptionsError(f"{model}: {what} has {tokens} tokens, not divisible by sequence_parallel={degree} "
                           f"({which} divide it){why}; choose a resolution (or frame count) whose token count the "
                           "degree divides")


@dataclasses.dataclass
class ShardPlan:
    degree: int
    rank: int
    group: object
    model_inputs: Dict[int, int]          # top-level input index -> split dim (before the prologue)
    split_values: Dict[torch.fx.Node, object]  # prologue outputs split for every consumer -> _local spec
    sharded: Dict[int, Dict[int, int]]    # block index -> {input position: token dim} arriving sharded
    gather: Dict[int, int]                # gather point's output index -> gather dim (see gather_point)
    sizes: Dict[int, Tuple[int, int]]     # size input (dynamic dim) -> (tensor input, dim) it is the size of
    model: str = "the model"              # for messages
    # the model's own size inputs that the blocks take as token counts (Qwen-Image's image token count and
    # height): divided where they enter a block, whole in the prologue
    block_counts: FrozenSet[torch.fx.Node] = frozenset()
    pads: Dict[int, int] = dataclasses.field(default_factory=dict)  # this call's: tokens per rank -> pad

    def block_inputs(self, block: torch.fx.Node, inputs: list) -> list:
        return [self.split(t, None, a.name) if a in self.block_counts else t for a, t in zip(block.args, inputs)]

    def split_model_inputs(self, args) -> tuple:
        self.pads = {}
        args = [self.split(a, self.model_inputs[i], f"model input {i}") if i in self.model_inputs else a
                for i, a in enumerate(args)]
        return local_sizes(args, self.sizes)

    def split(self, x, dim, what: str):
        """This rank's part of ``x`` (``dim``: see ``_local``)."""
        if dim is None:
            check_divisible(self.model, what, int(x), self.degree)
        elif not isinstance(dim, MaskSplit):
            pad = padding(x.shape[dim], self.degree)
            local = (x.shape[dim] + pad) // self.degree
            if self.pads.setdefault(local, pad) != pad:
                raise OptionsError(f"sequence_parallel: {self.model}'s split sequences of {local} tokens per rank need "
                                   f"different padding to a multiple of {self.degree} ({what}: {x.shape[dim]} tokens); "
                                   "choose a resolution (or frame count) whose token counts the degree divides")
            if local <= pad:
                raise OptionsError(f"sequence_parallel: {what} has {x.shape[dim]} tokens, too few for "
                                   f"sequence_parallel={self.degree} (the last rank would hold only padding)")
        return _local(x, dim, self.degree, self.rank)

    def padded(self) -> Tuple[Tuple[int, int], ...]:
        """(tokens per rank, pad) of this call's split sequences where one was padded, else ()."""
        return tuple(sorted(self.pads.items())) if any(self.pads.values()) else ()

    def whole(self, arg: torch.fx.Node, value):
        """A value as the pieces outside the blocks see it: a token count split for the blocks, whole again."""
        split = isinstance(arg, torch.fx.Node) and arg in self.split_values and self.split_values[arg] is None
        return value * self.degree if split else value

    def gather_dim(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``x`` joined along ``dim``, in rank order, by ``all_gather_peers``. CUDA: copy engines, so
        a captured forward (options' ``cuda_graphs``) holds no NCCL kernel, which would hang the process group's
        teardown (pytorch/pytorch#115388; where symmetric memory is unavailable it falls back to NCCL, and
        runtime/cuda_graph.py then captures nothing); the result is copied out of the exchange's buffer, which
        later calls reuse. Elsewhere: the collective all-gather."""
        group = (self.group or dist.group.WORLD).group_name
        dim %= x.dim()
        out = torch.ops.mindiesd_compile.all_gather_peers([x], dim, group, True)[0]
        out = torch.ops._c10d_functional.wait_tensor(out)
        return out.narrow(dim, 0, out.shape[dim] - self.pads.get(x.shape[dim], 0)).clone()  # without the pad


def size_inputs(partition: Partition) -> Dict[int, Tuple[int, int]]:
    """Top-level size inputs (Dynamo passes a dynamic dim's size as its own SymInt input) -> the (tensor
    input, dim) whose size it is. A graph traced with dynamic sequence dims runs on a slice of the
    sequence once these follow the sliced tensors."""
    placeholders = [n for n in partition.graph_module.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    dims = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            for d, size in enumerate(v.shape):
                if isinstance(size, torch.SymInt):
                    dims.setdefault(size.node.expr, (i, d))
    return {i: dims[v.node.expr] for i, v in enumerate(values)
            if isinstance(v, torch.SymInt) and v.node.expr in dims}


def local_sizes(args, sizes: Dict[int, Tuple[int, int]]) -> tuple:
    return tuple(args[sizes[i][0]].shape[sizes[i][1]] if i in sizes else a for i, a in enumerate(args))


def mark_sequence_dynamic(model: torch.nn.Module, kwargs: dict) -> dict:
    """Mark the inputs the model's ``_cp_plan`` splits as dynamic along their split dim (for a built-in plan,
    also the input dim its image token count follows), before the first compiled call: models whose traced
    graph would otherwise fix token counts (joint text+image attention split back by length: Flux,
    HunyuanVideo, SD3) then run on a slice of the sequence. Returns ``kwargs``."""
    model = getattr(model, "_orig_mod", model)  # compiled or not
    plan = getattr(type(model), "_cp_plan", None)
    blocks = next((m for m in model.children() if isinstance(m, torch.nn.ModuleList) and len(m)), None)
    builtin = builtin_plan(type(blocks[0])) if blocks is not None else None
    dims = {}
    if builtin_applies(builtin, plan):  # split after the prologue: mark what the image token count follows
        dims, plan = dict(builtin.dynamic), builtin.plan
        _trace_ints_as_symbols([name for name in builtin.dynamic_ints if name in kwargs])
    for name, spec in ((plan or {}).get("") or {}).items():
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor) and (spec.expected_dims is None or t.dim() == spec.expected_dims):
            dims[name] = spec.split_dim % t.dim()
    for name, dim in dims.items():
        if isinstance(kwargs.get(name), torch.Tensor):
            # "maybe": a model whose forward fixes the count anyway (positions from Python ints) is traced static
            # and the planner then says so, instead of Dynamo failing on a violated constraint
            torch._dynamo.maybe_mark_dynamic(kwargs[name], dim)
    return kwargs


def _trace_ints_as_symbols(names) -> None:
    """Dynamo traces the Python ints inside these keyword arguments as symbols (``torch.compiler.config
    .dynamic_sources``, a process-wide list, extended): positions built from them then follow a split token
    count. Ints equal to 0 or 1 stay constants."""
    config = torch.compiler.config
    if not hasattr(config, "dynamic_sources"):  # an older torch: traced static, and the planner says so
        return
    have = [s for s in config.dynamic_sources.split(",") if s]
    new = [rf".*\['{name}'\]\[.*" for name in names]  # e.g. L['kwargs']['img_shapes'][0][1]
    config.dynamic_sources = ",".join(have + [p for p in new if p not in have])


def find_cp_plan(partition: Partition) -> Optional[dict]:
    """The ``_cp_plan`` of the model class that owns the blocks (looked up in the block class's module),
    else the built-in plan for the block class."""
    owner = _plan_owner(partition)
    return owner[1] if owner else None


def _plan_owner(partition: Partition) -> Optional[Tuple[str, dict]]:
    """(model class name, plan) as ``find_cp_plan`` finds it."""
    block = _block_class(partition)
    builtin = builtin_plan(block) if block is not None else None
    module = sys.modules.get(getattr(block, "__module__", ""))
    shipped = next(((v.__name__, v._cp_plan) for v in (vars(module).values() if module else ())
                    if isinstance(v, type) and isinstance(getattr(v, "_cp_plan", None), dict)), None)
    if builtin_applies(builtin, shipped):
        return builtin.model, builtin.plan
    return shipped


def _block_class(partition: Partition) -> Optional[type]:
    first = partition.blocks[0]
    for node in partition.graph_module.get_submodule(first.name).graph.nodes:
        for raw, cls in (node.meta.get("nn_module_stack") or {}).values():
            if module_path(raw) == first.label:
                return cls
    return None


def _top_input_index(placeholders, name: str) -> Optional[int]:
    """Dynamo names a forward argument's placeholder ``l_<name>_`` (``l_kwargs_<name>_`` when passed by keyword)."""
    for i, p in enumerate(placeholders):
        if p.name in (f"l_{name}_", f"l_kwargs_{name}_"):
            return i
    return None


def _run_shapes(partition: Partition, args, split_values=None, degree=1, masks=None, block_counts=()):
    """Run the partition on fake tensors: every block's input shapes, the last block's output shapes and those of
    the last piece that runs on each rank's tokens (``gather_point``) (``masks``: collects, per block node, the
    inputs that are masks over the whole joint sequence; ``block_counts``: see ShardPlan)."""
    gm = partition.graph_module
    block_names = [p.name for p in partition.blocks]
    last_local = gather_point(partition)
    local_pieces = {*block_names, last_local}
    env, it, ins, last_out = {}, iter(args), {}, None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(it)
        elif node.op != "output":
            fn = gm.get_submodule(node.target) if node.op == "call_module" else node.target
            inputs = list(torch.fx.map_arg(node.args, env.__getitem__))
            if node.op == "call_module" and node.target in local_pieces:
                inputs = [t // degree if a in block_counts else t for a, t in zip(node.args, inputs)]
            if node.op == "call_module" and node.target in block_names:
                ins[block_names.index(node.target)] = _shapes(inputs)
                fn = _MaskProbe(fn, masks.setdefault(node, {}), degree).run if masks is not None else fn
            env[node] = fn(*inputs)
            if split_values and node in split_values:
                env[node] = _local(env[node], split_values[node], degree, 0)
            if node.op == "call_module" and node.target == block_names[-1]:
                last_out = _shapes(env[node])
            if node.op == "call_module" and node.target == last_local:
                return ins, last_out, _shapes(env[node])  # what follows gets the gathered outputs
    raise AssertionError("no blocks")


def _shapes(values) -> list:
    return [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in values]


def gather_point(partition: Partition) -> str:
    """The last piece that runs on each rank's tokens: the epilogue where it ends at the plan's gather module
    (it need not be token-wise then: Flux.2 drops the text tokens from its joint sequence by their count), else
    the last block (what follows it must be token-wise up to the gather module, as in Wan, Flux, HunyuanVideo)."""
    return partition.gathered_after or partition.blocks[-1].name


def gather_modules(cp_plan: Optional[dict]) -> list:
    """The modules whose output the plan gathers (``proj_out``)."""
    return [module for module, entry in (cp_plan or {}).items() if module and not isinstance(entry, dict)]


_SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)


class _MaskProbe(torch.fx.Interpreter):
    """Runs a block on a rank's slice; an attention mask built for the whole joint sequence (in the
    prologue, which runs unsplit) cannot apply there: it is recorded (block input -> MaskSplit) and
    left out of this shape-only run."""

    def __init__(self, block, masks: dict, degree: int):
        super().__init__(block)
        self.masks, self.degree = masks, degree
        self.inputs = [n for n in block.graph.nodes if n.op == "placeholder"]

    def run_node(self, n):
        if n.target not in _SDPA:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        names = ("query", "key", "value", "attn_mask")
        q, k, v, mask = (kwargs.get(name, args[i] if len(args) > i else None) for i, name in enumerate(names))
        if mask is None or mask.shape[-1] == k.shape[-2]:
            return super().run_node(n)
        source = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
        while source.op != "placeholder" and len(source.all_input_nodes) == 1:
            source = source.all_input_nodes[0]
        if source.op != "placeholder" or mask.dim() < 2 or mask.shape[-2] != 1:
            raise OptionsError(f"sequence_parallel: attention {n.name} takes a mask over the whole joint sequence "
                               f"{tuple(mask.shape)} that is not a [..., 1, keys] block input; only key-padding "
                               "masks built before the blocks can follow the split")
        self.masks[self.inputs.index(source)] = MaskSplit(mask.dim() - 1, self.degree * k.shape[-2] - mask.shape[-1])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _differing_dim(full, local) -> Optional[int]:
    if full is None or local is None or full == local:
        return None
    dims = [d for d, (a, b) in enumerate(zip(full, local)) if a != b]
    return dims[0] if len(dims) == 1 else None


def plan_sequence_parallel(partition: Partition, args, degree: int, group, cp_plan: Optional[dict]) -> ShardPlan:
    owner = _plan_owner(partition)
    model = owner[0] if owner else f"the model of {getattr(_block_class(partition), '__name__', 'these')} blocks"
    if cp_plan is None:
        raise OptionsError(f"sequence_parallel needs a context-parallel plan: {model} has no diffusers `_cp_plan` "
                           "and no built-in one; pass one as options['parallel_plan'] (same format)")
    # "transformer_blocks.*" (Qwen-Image), "blocks.*.attn1" (Helios: splits and gathers around each sub-module)
    per_block = {m: sorted(map(str, e)) for m, e in cp_plan.items() if "*" in m and isinstance(e, dict)}
    if per_block:
        raise OptionsError(f"sequence_parallel: {model}'s parallel plan splits inputs of every block by name "
                           f"({per_block}); the sequence is split once, where it enters the first block, and "
                           "per-block entries are not supported; pass options['parallel_plan'] without them "
                           "(the blocks must then take those inputs unsplit), or run without sequence_parallel")
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world != degree:
        raise OptionsError(f"sequence_parallel={degree} but the process group has {world} rank(s); "
                           f"launch {degree} processes (torchrun --nproc_per_node={degree})")
    placeholders = [n for n in partition.graph_module.graph.nodes if n.op == "placeholder"]
    model_inputs = {}
    for name, spec in (cp_plan.get("") or {}).items():
        index = _top_input_index(placeholders, name)
        if index is None or not isinstance(args[index], torch.Tensor):
            continue
        if spec.expected_dims is not None and args[index].dim() != spec.expected_dims:
            continue
        model_inputs[index] = spec.split_dim % args[index].dim()

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        full_in, full_out, full_gathered = _run_shapes(partition, fake)
        first = next(n for n in partition.graph_module.graph.nodes if n.target == partition.blocks[0].name)
        entries = _block_entries(partition, cp_plan, full_in[0], full_out)
        sizes = size_inputs(partition)
        counts = _token_counts(partition, entries, degree)
        for p, dim in entries.items() if counts else ():  # a count is divided exactly: no padding
            check_divisible(model, "the sequence entering the blocks", full_in[0][p][dim], degree,
                            ", and its blocks rebuild the token count from the model's sizes, so it cannot be padded")
        entries.update({p: None for p in counts if first.args[p].op != "placeholder"})
        # a size input of the model's own: whole in the prologue (unless its tensor is split there already)
        local_already = {placeholders[i] for i, (t, d) in sizes.items() if model_inputs.get(t) == d}
        block_counts = frozenset(first.args[p] for p in counts if first.args[p].op == "placeholder") - local_already
        split_values = {first.args[p]: dim for p, dim in entries.items()}
        local_args = local_sizes([_local(a, model_inputs[i], degree, 0) if i in model_inputs else a
                                  for i, a in enumerate(fake)], sizes)
        try:
            masks = {}
            local_in, _, local_gathered = _run_shapes(partition, local_args, split_values, degree, masks, block_counts)
            for node, found in masks.items():
                split_values.update({node.args[p]: spec for p, spec in found.items()})
            if any(masks.values()):  # again, with the masks as the ranks will get them
                local_in, _, local_gathered = _run_shapes(partition, local_args, split_values, degree, None,
                                                          block_counts)
        except RuntimeError as err:
            marked = any(getattr(a, "_dynamo_weak_dynamic_indices", None) or getattr(a, "_dynamo_dynamic_indices", None)
                         for a in args if isinstance(a, torch.Tensor))
            fix = ("it was traced with dynamic sequence dims, yet a block still derives a token count from the "
                   "model's input sizes (which every rank passes whole): not supported") if sizes else (
                  "its sequence dims were marked dynamic, yet its forward fixes the token count (e.g. positions "
                  "built from Python ints such as frame/height/width arguments): not supported") if marked else (
                  "trace the sequence dims dynamically: call mindiesd_compile.mark_sequence_dynamic(model, kwargs) "
                  "before the first compiled call")
            raise OptionsError(
                f"sequence_parallel: {model}'s traced graph fixes token counts (e.g. joint text+image attention "
                f"split back by the traced text length), so it cannot run on a slice of the sequence; {fix} "
                f"({str(err).splitlines()[0][:160]})") from err
    sharded = {j: {p: d for p, (a, b) in enumerate(zip(full_in[j], local_in[j]))
                   if (d := _differing_dim(a, b)) is not None} for j in full_in}
    gather = {k: d for k, (a, b) in enumerate(zip(full_gathered, local_gathered))
              if (d := _differing_dim(a, b)) is not None}
    if not sharded[0]:
        raise OptionsError(f"{model}: the parallel plan shards nothing that reaches the transformer blocks")
    return ShardPlan(degree, dist.get_rank(group), group, model_inputs, split_values, sharded, gather, sizes, model,
                     block_counts)


def _carries(top: torch.fx.GraphModule, node, source: torch.fx.Node) -> bool:
    """Whether top-level ``node`` is computed from ``source`` (through the pieces: the piece output it takes)."""
    if node is source:
        return True
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is operator.getitem and node.args[0].op == "call_module":
        piece = node.args[0]
        inner = [n for n in top.get_submodule(piece.target).graph.nodes if n.op == "placeholder"]
        out = next(n for n in top.get_submodule(piece.target).graph.nodes if n.op == "output").args[0][node.args[1]]
        needs = ancestors([out])
        return any(p in needs and _carries(top, a, source) for p, a in zip(inner, piece.args))
    return any(_carries(top, a, source) for a in node.all_input_nodes)


def _token_counts(partition: Partition, entries: Dict[int, int], degree: int) -> Dict[int, None]:
    """First-block inputs that are numbers the blocks derive a split token count from (SymInts of a dynamic
    trace: HunyuanVideo's token count, SD3's latent height in patches, Qwen-Image's frames, height and width,
    which its blocks multiply back into a token count): the blocks must see this rank's share. A count that is
    a product of sizes has one factor divided: the first the blocks take that the degree divides (Qwen-Image:
    its height where there is one frame). Checked by the shape run on a slice that follows."""
    top = partition.graph_module
    first = next(n for n in top.graph.nodes if n.target == partition.blocks[0].name)
    values = [p.meta.get("example_value", p.meta.get("val"))
              for p in top.get_submodule(first.target).graph.nodes if p.op == "placeholder"]
    ints = {p: v for p, v in enumerate(values) if isinstance(v, torch.SymInt) and v.node.expr.free_symbols}
    numbers = {p: v.node.expr for p, v in ints.items()}
    taken = set().union(*(e.free_symbols for e in numbers.values()))
    hints = {v.node.expr: v.node.hint for v in ints.values() if v.node.expr.is_Symbol}  # this call's sizes
    divided = set()
    for p, d in entries.items():
        size = values[p].shape[d] if isinstance(values[p], torch.Tensor) else None
        if not isinstance(size, torch.SymInt):
            continue
        factors = sorted(size.node.expr.free_symbols & taken, key=str)
        if factors and not divided & set(factors):
            divided.add(next((f for f in factors if int(hints.get(f) or 1) % degree == 0), factors[0]))
    return {p: None for p, e in numbers.items() if e.free_symbols & divided}


def _block_entries(partition: Partition, cp_plan: dict, in_shapes, out_shapes) -> Dict[int, int]:
    """First-block inputs named by module-level split entries: module outputs (``rope``) and the
    block's own inputs (``blocks.0``: ``hidden_states`` = the residual stream)."""
    first_block = partition.blocks[0]
    top = partition.graph_module
    block_node = next(n for n in top.graph.nodes if n.op == "call_module" and n.target == first_block.name)
    placeholders = [n for n in top.graph.nodes if n.op == "placeholder"]
    result = {}
    for module, entries in cp_plan.items():
        if module == "" or not isinstance(entries, dict):
            continue
        for key, spec in entries.items():
            specs = spec if isinstance(spec, (list, tuple)) else [spec]
            if module == first_block.label:  # the block's input by name: its residual streams (shaped like
                # its outputs), those computed from the model's input of that name where there is one (Qwen-Image:
                # the image stream, not the text's)
                streams = [p for p, shape in enumerate(in_shapes) if shape is not None and shape in out_shapes]
                source = _top_input_index(placeholders, key)
                named = [p for p in streams if source is not None and _carries(top, block_node.args[p],
                                                                                placeholders[source])]
                for p in named or streams:
                    if len(in_shapes[p]) == (specs[0].expected_dims or len(in_shapes[p])):
                        result[p] = specs[0].split_dim % len(in_shapes[p])
            elif isinstance(key, int) and specs[0].split_output:
                for p, arg in enumerate(block_node.args):
                    if _produced_by(top, arg, module) == key and in_shapes[p] is not None:
                        result[p] = specs[0].split_dim % len(in_shapes[p])
    return result


def _produced_by(top, arg, module: str) -> Optional[int]:
    """If ``arg`` (a first-block input) is output k of ``module`` inside the prologue, k (in output order)."""
    if not (isinstance(arg, torch.fx.Node) and arg.target is operator.getitem and arg.args[0].op == "call_module"):
        return None
    piece = top.get_submodule(arg.args[0].target)
    out = next(n for n in piece.graph.nodes if n.op == "output")
    value = out.args[0][arg.args[1]]
    from_module = [v for v in out.args[0] if in_module(v, module)]
    return from_module.index(value) if value in from_module else None


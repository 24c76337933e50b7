"""Shared helpers: compile a function through the passes (target "eager") and see what came out."""
from __future__ import annotations

import collections
import multiprocessing
import os

# torch raises, rather than warns, on a custom op whose outputs alias where CI=1 is set: make every run (and every
# rank a test spawns) as strict, so a local run fails where CI would.
os.environ["TORCHINDUCTOR_ERROR_ON_CUSTOM_OP_ALIASING"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings

from mindiesd_compile import CompileOptions, Report
from mindiesd_compile.backend import build_manager
from mindiesd_compile.lowering.eager import compile_eager
from mindiesd_compile.ops import op_name
from mindiesd_compile.passes import GraphPass


# A distributed test's ranks fork from one server process that imported these once: a rank spawned afresh spends
# ~5 s of a 2-core machine importing them, most of such a test.
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "diffusers", "mindiesd_compile", "tiny_models"])


def spawn_ranks(fn, args, nprocs: int) -> None:
    """``torch.multiprocessing.spawn``: ``fn(rank, *args)`` in ``nprocs`` processes, a rank's exception raised here;
    each rank forked from the preloaded server (it never ran an op, so no thread pool is forked)."""
    torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


# Each example compiles a graph (~0.1-0.5 s): few, reproducible examples, no per-example deadline.
settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True)
settings.load_profile("ci")


class OpCounter(GraphPass):
    """Appended after the passes: counts the ops of the final graph (independent of the report), mindiesd_compile
    ops by their short name ("rms_norm"), ATen ops by their overload packet ("aten.tanh")."""
    name = "count_ops"

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __call__(self, graph):
        for n in graph.nodes:
            if n.op == "call_function":
                self.counts[op_name(n.target) or str(getattr(n.target, "overloadpacket", n.target))] += 1


class Compiled:
    """Result of compiling ``fn`` through the passes: output, report, and op counts of the final graph."""

    def __init__(self, fn, args, kwargs=None, target="eager", **options):
        opts = CompileOptions.from_dict({"strict": True, **options})
        self.report = Report(opts.patterns)
        self.ops = collections.Counter()

        def backend(gm, example_inputs):
            manager = build_manager(opts, target, self.report)
            manager.passes.append(OpCounter(self.ops))
            return compile_eager(gm, example_inputs, manager)

        torch._dynamo.reset()
        with torch.no_grad():
            self.out = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args, **(kwargs or {}))

    def rewritten(self, pattern):
        return self.report.stats(pattern).rewritten


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

"""PassManager: runs the enabled passes in order on one graph, safely.

For every pass: time it, dump the graph before/after on request, lint the result, and if the pass
raises or leaves a broken graph, put the graph back exactly as it was and warn (``strict``: raise).
A pass that fails can cost speed, never correctness. Installed as Inductor's
``post_grad_custom_pre_pass`` (before Inductor's own post-grad fusions claim the patterns); its
``uuid()`` hashes every pass's source and the options, so Inductor's FX graph cache stays valid.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import os
import time
import warnings
from typing import Sequence

try:
    from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass as _PassBase
except ImportError:  # torch < 2.12: every post-grad graph we are given is treated as inference
    from torch._inductor.custom_graph_pass import CustomGraphPass as _PassBase
from torch.fx import Graph

from ..report import Report
from .base import GraphPass

log = logging.getLogger("mindiesd_compile")
_graph_ids = itertools.count(1)  # one numbering for every graph compiled in this process (dump file names)


class PassFailedError(RuntimeError):
    """A pass raised under ``strict=True``."""


class PassManager(_PassBase):
    def __init__(self, passes: Sequence[GraphPass], report: Report, *, strict: bool = False,
                 dump_graphs: str | None = None, config_key: str = ""):
        self.passes = list(passes)
        self.report = report
        self.strict = strict
        self.dump_graphs = dump_graphs
        self.config_key = config_key
        self.graph_id = 0

    def __deepcopy__(self, memo):
        # Inductor deep-copies config patches (AOTInductor does): the copy must keep writing to our report.
        return self

    def uuid(self) -> bytes:
        h = hashlib.sha256(self.config_key.encode())
        for p in self.passes:
            h.update(p.uuid())
        return h.digest()

    def __call__(self, graph: Graph, is_inference: bool = True) -> None:
        if not is_inference:
            log.warning("mindiesd_compile: training graph compiled without rewrites (run under torch.no_grad())")
            return
        self.graph_id = next(_graph_ids)
        self._dump(graph, "00_input")
        for i, p in enumerate(self.passes, 1):
            snapshot = copy.deepcopy(graph)
            start = time.perf_counter()
            try:
                p(graph)
                graph.lint()
            except Exception as err:  # noqa: BLE001 - any failure must leave a correct graph behind
                _restore(graph, snapshot)
                self.report.failed(p.name, err)
                if getattr(p, "required", False):
                    raise  # e.g. sequence parallelism: without this pass the result would be wrong
                if self.strict:
                    raise PassFailedError(f"mindiesd_compile pass {p.name!r} failed: {err}") from err
                warnings.warn(f"mindiesd_compile: pass {p.name!r} failed ({type(err).__name__}: {err}); "
                              "the graph is kept as it was before this pass", RuntimeWarning, stacklevel=2)
            self.report.timings[p.name] = self.report.timings.get(p.name, 0.0) + time.perf_counter() - start
            self._dump(graph, f"{i:02d}_{p.name}")
        log.info("mindiesd_compile rewrites (graph %d):\n%s", self.graph_id, self.report.table())

    def _dump(self, graph: Graph, label: str) -> None:
        if self.dump_graphs:
            os.makedirs(self.dump_graphs, exist_ok=True)
            path = os.path.join(self.dump_graphs, f"graph{self.graph_id:03d}_{label}.txt")
            with open(path, "w") as f:
                f.write(str(graph))


def _restore(graph: Graph, snapshot: Graph) -> None:
    """Make ``graph`` (in place: its owner holds it) a copy of ``snapshot``."""
    for node in reversed(list(graph.nodes)):
        graph.erase_node(node)
    output = graph.graph_copy(snapshot, {})
    graph.output(output)

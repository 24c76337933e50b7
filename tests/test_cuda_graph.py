"""options["cuda_graphs"]: validation, the replay wrapper's handling of inputs and outputs, and what "auto" keeps.

CI has no GPU, so the wrapper runs against a stand-in with CUDA graphs' documented semantics: a capture
records the forward on the buffers it was given (and the wrapper's own ops around it), a replay reruns it on
whatever those buffers hold now and writes the same output buffers. What is checked is ours: which inputs are
copied, which are read in place, that outputs are fresh tensors, recapture when a parameter is replaced, the
op-by-op fallback, what pieces share, and "auto"'s choice from timed calls (sleeps stand in for the host issuing
and for the GPU running). The real graphs are measured on the GPU (bench/bench_sp_qwen.py --graphs auto,
bench/bench_cache_graphs.py, bench/check_cuda_graphs.py, bench/RESULTS.md).
"""
import contextlib
import logging
import time
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mindiesd_compile import StepCache
from mindiesd_compile.options import CompileOptions, OptionsError
from mindiesd_compile.runtime.cuda_graph import CudaGraphForward


class StandInGraph:
    def __init__(self, cuda):
        self.forward, self.cuda, self.around = None, cuda, []

    def replay(self):
        fn, inputs, outputs = self.forward
        self.cuda.replaying = True
        try:
            for out, new in zip(outputs, fn(*inputs)):
                out.copy_(new)
            for op, args, kwargs in self.around:  # e.g. the outputs' copies into a piece's shared slots
                op(*args, **kwargs)
        finally:
            self.cuda.replaying = False


class RecordAround(TorchDispatchMode):
    """During a capture: the ops the wrapper runs outside the recorded forward, which a replay runs again."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.graph.cuda.in_forward:
            self.graph.around.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


class StandInCuda:
    """torch.cuda's graph API as the wrapper uses it, on the CPU. ``gpu_s``: how long ``synchronize`` waits, as
    for kernels still running after the host issued them."""

    def __init__(self, fail=False, gpu_s=0.0):
        self.fail, self.captures, self.capturing, self.replaying, self.gpu_s = fail, 0, None, False, gpu_s
        self.in_forward = False
        self.pools = set()  # the memory pools captures were given
        self.streams = 0    # side streams made

    def Stream(self, device):  # noqa: N802 - torch.cuda's name
        self.streams += 1
        return StandInStream()

    current_stream = staticmethod(lambda device: StandInStream())
    stream = staticmethod(lambda s: contextlib.nullcontext())

    def synchronize(self, device):
        time.sleep(self.gpu_s)

    def CUDAGraph(self):  # noqa: N802 - torch.cuda's name
        return StandInGraph(self)

    def graph_pool_handle(self):
        return object()

    @contextlib.contextmanager
    def graph(self, g, pool=None, capture_error_mode="global"):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        self.pools.add(pool)
        self.capturing = g
        try:
            with RecordAround(g):
                yield
        except Exception:  # as CUDA: ending a capture an op broke fails with an error of its own
            raise RuntimeError("operation failed due to a previous error during capture")
        finally:
            self.capturing = None


class StandInStream:
    def wait_stream(self, other):
        pass


def recording(fn, cuda):
    def recorded(*args):  # what a capture records: the forward over the buffers it was handed
        cuda.in_forward = True
        try:
            out = fn(*args)
        finally:
            cuda.in_forward = False
        if cuda.capturing is not None:
            cuda.capturing.forward = (fn, args, out)
        return out
    recorded._boxed_call = True  # as on Inductor's compiled forward, which Dynamo nevertheless calls unboxed
    return recorded


def wrap(fn, fail=False, group=None, auto=False, gpu_s=0.0):
    cuda = StandInCuda(fail, gpu_s)
    return CudaGraphForward(recording(fn, cuda), torch.device("cpu"), graphs=cuda, group=group, auto=auto), cuda


def forward(w, b, x, t):
    return (x @ w + b * t, (x * 2).sum(0))


def test_replay_reads_new_inputs_and_returns_fresh_outputs():
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    fast, cuda = wrap(forward)
    calls = [(torch.randn(5, 4), torch.tensor(float(i))) for i in range(4)]
    outs = [fast(w, b, x, t) for x, t in calls]
    assert cuda.captures == 1  # first call op by op, the second captures, the rest replay
    for (x, t), out in zip(calls, outs):  # each output still holds its own call's result (CFG: cond, then uncond)
        for got, want in zip(out, forward(w, b, x, t)):
            torch.testing.assert_close(got, want)
    entry = next(iter(fast.captured.values()))
    assert entry.inputs[0] is w and entry.inputs[1] is b  # parameters are read in place, never copied
    assert entry.inputs[2] is not calls[1][0]  # activations go through the graph's own buffer


def test_replaced_parameter_recaptures_and_new_shapes_start_op_by_op():
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    fast, cuda = wrap(forward)
    x, t = torch.randn(5, 4), torch.tensor(1.0)
    fast(w, b, x, t), fast(w, b, x, t)
    w2 = torch.nn.Parameter(torch.randn(4, 3))  # weights reloaded
    torch.testing.assert_close(fast(w2, b, x, t)[0], forward(w2, b, x, t)[0])
    assert cuda.captures == 2
    x7 = torch.randn(7, 4)  # a new signature: op by op first, captured on its second call
    for _ in range(3):
        torch.testing.assert_close(fast(w2, b, x7, t)[0], forward(w2, b, x7, t)[0])
    assert cuda.captures == 3 and len(fast.captured) == 2 and cuda.streams == 1  # one warm-up stream for all


def test_failed_capture_runs_op_by_op_with_one_warning():
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    fast, cuda = wrap(forward, fail=True)
    x, t = torch.randn(5, 4), torch.tensor(1.0)
    fast(w, b, x, t)
    with pytest.warns(RuntimeWarning, match="capturing the forward failed"):
        fast(w, b, x, t)
    for _ in range(2):  # no second attempt, no second warning, results right
        torch.testing.assert_close(fast(w, b, x, t)[0], forward(w, b, x, t)[0])
    assert cuda.captures == 0


def test_failed_capture_names_the_error_that_broke_it():
    def host_sync(w, b, x, t):  # e.g. a blocking copy from the CPU: it synchronizes, which a capture forbids
        if cuda.capturing is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        return forward(w, b, x, t)
    fast, cuda = wrap(host_sync)
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    x, t = torch.randn(5, 4), torch.tensor(1.0)
    fast(w, b, x, t)
    with pytest.warns(RuntimeWarning, match="failed \\(RuntimeError: operation not permitted when stream is capturing"):
        torch.testing.assert_close(fast(w, b, x, t)[0], forward(w, b, x, t)[0])


@pytest.mark.parametrize("failed", ["here", "on another rank", None])
def test_sequence_parallel_ranks_capture_together_or_not_at_all(failed, monkeypatch):
    """A capture that fails on one rank (here, or on another: the all-reduce says so) leaves every rank op by op,
    with the exchange's slot turns as they were before the capture: a rank that kept them advanced would write
    into the slot its peers are not reading. When every rank captured, the graph is kept."""
    from mindiesd_compile.ops import peer_gather
    slots = peer_gather._Slots("sp-test")
    reduced = []

    def all_reduce(flag, op, group):  # MIN over the ranks: 0 if any failed
        reduced.append((int(flag), group))
        flag.mul_(0 if failed else 1)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(peer_gather, "on_copy_engines", lambda group, device: True)
    try:
        def exchanging(w, b, x, t):  # each call takes the next slot, as all_gather_peers does
            slots.turn = 1 - slots.turn
            return forward(w, b, x, t)
        fast, cuda = wrap(exchanging, fail=failed == "here", group="sp-group")
        w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
        x, t = torch.randn(5, 4), torch.tensor(1.0)
        fast(w, b, x, t)
        turn = slots.turn
        with pytest.warns(RuntimeWarning, match="not permitted" if failed == "here" else "on another rank") \
                if failed else contextlib.nullcontext():
            torch.testing.assert_close(fast(w, b, x, t)[0], forward(w, b, x, t)[0])
        assert reduced == [(0 if failed == "here" else 1, "sp-group")]
        entry = next(iter(fast.captured.values()))
        # failed: warm-up and capture undone, the op-by-op call counted
        assert (entry is None and slots.turn == 1 - turn) if failed else entry is not None
    finally:
        peer_gather._ALL_SLOTS.remove(slots)


def test_sequence_parallel_over_nccl_is_never_captured(monkeypatch):
    """Without symmetric memory the exchange falls back to NCCL: a graph holding its kernels would hang the
    process group's teardown, so the forward stays op by op, with the reason."""
    from mindiesd_compile.ops import peer_gather
    monkeypatch.setattr(peer_gather, "on_copy_engines", lambda group, device: False)
    fast, cuda = wrap(forward, group="sp-group")
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    x, t = torch.randn(5, 4), torch.tensor(1.0)
    fast(w, b, x, t)
    with pytest.warns(RuntimeWarning, match="runs on NCCL"):
        torch.testing.assert_close(fast(w, b, x, t)[0], forward(w, b, x, t)[0])
    assert cuda.captures == 0


@pytest.mark.parametrize("options, message", [
    ({"cuda_graphs": "yes"}, "must be True, False or 'auto'"),
    ({"cuda_graphs": True, "target": "cpu"}, "target 'cuda' only"),
    ({"cuda_graphs": True, "sparse_attention": {"sparsity": 0.5}}, "changes from step to step"),
    # NCCL kernels in a graph hang the process group's teardown: only the copy-engine exchange is captured
    ({"cuda_graphs": True, "sequence_parallel": 2, "sequence_parallel_mode": "ulysses"}, "pytorch/pytorch#115388"),
    ({"cuda_graphs": True, "sequence_parallel": 4, "sequence_parallel_overlap": False}, "copy-engine exchange"),
    ({"cuda_graphs": True, "sequence_parallel": 8}, "sequence_parallel_mode 'gather_kv'"),  # auto: Ulysses on 8
])
def test_bad_options_name_the_problem(options, message, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # sequence_parallel asks for it
    with pytest.raises(OptionsError, match=message):
        CompileOptions.from_dict(options)


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_with_the_copy_engine_exchange_may_be_captured(world, monkeypatch):
    """On 2-4 ranks "auto" is gather_kv with an overlap: its graphs hold no NCCL kernel."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    options = CompileOptions.from_dict({"cuda_graphs": True, "sequence_parallel": world})
    assert options.sequence_parallel_exchange("cuda") == "gather_kv" and options.sequence_parallel_overlap_for("cuda")


def test_inputs_on_the_cpu_are_refused_before_compiling():
    model = torch.nn.Linear(4, 4)
    fast = torch.compile(model, backend="mindiesd", options={"cuda_graphs": True})
    with pytest.raises(Exception, match="needs target 'cuda'"):
        fast(torch.randn(2, 4))


# --- "auto": capture what pays ------------------------------------------------------------------------------------

def issuing(host_s, replay_s):
    """A forward whose host takes ``host_s`` to issue op by op and ``replay_s`` replayed (a sleep stands in)."""
    def fn(w, b, x, t):
        time.sleep(replay_s if cuda.replaying else host_s)
        return forward(w, b, x, t)
    fast, cuda = wrap(fn, auto=True)
    return fast, cuda


def run_calls(fast, n):
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    calls = [(torch.randn(5, 4), torch.tensor(float(i))) for i in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" only tries: never a warning
        outs = [fast(w, b, x, t) for x, t in calls]
    for (x, t), out in zip(calls, outs):
        for got, want in zip(out, forward(w, b, x, t)):
            torch.testing.assert_close(got, want)


def test_auto_keeps_a_graph_that_beats_a_host_bound_forward(caplog):
    """Op by op the host issues for 30 ms and the GPU waits on it; replayed, the host does nothing: the second
    call is timed op by op, the third captures, the fourth (the second replay) is timed and the graph stays."""
    fast, cuda = issuing(host_s=0.03, replay_s=0.0)
    with caplog.at_level(logging.INFO, logger="mindiesd_compile"):
        run_calls(fast, 6)
    assert cuda.captures == 1 and next(iter(fast.captured.values())) is not None and not fast.trials
    assert "kept" in caplog.text


def test_auto_frees_a_graph_that_is_not_faster(caplog):
    fast, cuda = issuing(host_s=0.02, replay_s=0.05)
    with caplog.at_level(logging.INFO, logger="mindiesd_compile"):
        run_calls(fast, 6)
    assert cuda.captures == 1 and next(iter(fast.captured.values())) is None and not fast.trials
    assert "freed, op by op from now on" in caplog.text


def test_auto_never_captures_a_forward_the_gpu_bounds(caplog):
    """The host issues at once and the GPU works 50 ms after: the GPU never waits for the host, nothing to win."""
    fast, cuda = wrap(forward, auto=True, gpu_s=0.05)
    with caplog.at_level(logging.INFO, logger="mindiesd_compile"):
        run_calls(fast, 4)
    assert cuda.captures == 0 and "the GPU bounds this forward" in caplog.text


def test_auto_logs_a_failed_capture_instead_of_warning(caplog):
    fast, cuda = wrap(lambda *a: (time.sleep(0.01), forward(*a))[1], fail=True, auto=True)
    with caplog.at_level(logging.INFO, logger="mindiesd_compile"):
        run_calls(fast, 4)
    assert cuda.captures == 0 and "capturing the forward failed" in caplog.text


@pytest.mark.parametrize("peer_graph_ms, kept", [(5.0, True), (40.0, False)])
def test_auto_ranks_follow_the_slowest_rank(peer_graph_ms, kept, monkeypatch):
    """Under sequence parallelism the times are the slowest rank's (an all-reduce MAX), so every rank makes the
    same choice. Here this rank alone would not even try (its GPU bounds it); a peer is bound by its host (30 ms
    op by op), so all try; the peer's replay then decides whether the graph stays."""
    from mindiesd_compile.ops import peer_gather
    peer = [[0.0, 0.0], [30.0, 30.0], [0.0, 0.0], [0.0, peer_graph_ms]]  # the peer's (host, wall) per reduction

    def all_reduce(t, op, group):
        if op == torch.distributed.ReduceOp.MAX:
            t.copy_(torch.maximum(t, torch.tensor(peer.pop(0))))  # else MIN over capture flags: all captured
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(peer_gather, "on_copy_engines", lambda group, device: True)
    fast, cuda = wrap(forward, group="sp-group", auto=True, gpu_s=0.005)
    run_calls(fast, 5)
    assert not peer and cuda.captures == 1 and (next(iter(fast.captured.values())) is not None) == kept


def test_auto_is_off_where_no_capture_can_be(monkeypatch):
    """The default: "auto" where a capture is possible, off (no error) where it is not; True still refuses."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    graphs = lambda target="cuda", inductor=False, **options: \
        CompileOptions.from_dict(options).cuda_graphs_for(target, inductor)  # noqa: E731
    assert graphs() == "auto" and graphs(sequence_parallel=2) == "auto" and graphs(sequence_parallel=4) == "auto"
    assert graphs(cuda_graphs=True) is True and graphs(cuda_graphs=False) is False
    assert graphs(target="cpu") is False and graphs(target="npu") is False
    assert graphs(cache={"policy": "block"}) == "auto" and graphs(cache=StepCache()) == "auto"  # judged per piece
    assert graphs(sparse_attention={"sparsity": 0.5}) is False
    assert graphs(sequence_parallel=2, sequence_parallel_mode="ulysses") is False  # NCCL in the graph
    assert graphs(sequence_parallel=4, sequence_parallel_overlap=False) is False
    assert graphs(inductor=True) is False  # torch.compile(mode="reduce-overhead"): Inductor's own graphs


def test_inductor_graphs_are_seen_in_the_mode_and_the_config():
    from mindiesd_compile.backend import _inductor_graphs
    assert _inductor_graphs(CompileOptions(), "reduce-overhead") and _inductor_graphs(CompileOptions(), "max-autotune")
    assert not _inductor_graphs(CompileOptions(), None) and not _inductor_graphs(CompileOptions(), "default")
    assert _inductor_graphs(CompileOptions.from_dict({"inductor_config": {"triton.cudagraphs": True}}), None)


def per_piece_loop(policy, late=False, auto=False, host_s=0.0, gpu_s=0.0):
    """A CFG denoising loop under ``policy`` op by op, then again with each piece wrapped as the backend does on a
    GPU (``replay_as_graphs``, over the stand-in; ``late``: compiled without a policy, which the handle's
    ``configure()`` sets after the wrapping; ``host_s``: how long issuing a piece takes op by op): the outputs of
    both, the runner, the stand-in and the handle."""
    from test_partition_cache import compiled, denoise, wan_inputs
    from mindiesd_compile.runtime.cuda_graph import replay_as_graphs
    model, kwargs_for = wan_inputs(layers=4)
    config = {"policy": policy, "step_interval": 2, "block_start": 1, "threshold": 0.3, "max_skips": 1}
    op_by_op, _ = compiled(model, config)
    want = [out[0] for _, _, out, _ in denoise(op_by_op, model, kwargs_for, steps=7)]
    torch._dynamo.reset()
    fn, cache = compiled(model, None if late else config)
    with torch.no_grad():
        fn(**kwargs_for(0, 0))  # builds the runner
    runner, cuda = cache.runners[0], StandInCuda(gpu_s=gpu_s)
    runner.compiled.clear()  # the pieces stay compiled (PieceCompiler); from here they are wrapped as on a GPU
    per_piece = CompileOptions.from_dict({"cache": cache}).caching  # what the backend asks
    assert replay_as_graphs(runner, torch.device("cpu"), None, auto, per_piece, graphs=cuda) is runner
    wrap_piece = runner.piece_graphs

    def issued(piece):
        def fn(*args):
            time.sleep(0.0 if cuda.replaying else host_s)
            return piece(*args)
        return fn
    runner.piece_graphs = lambda piece: wrap_piece(recording(issued(piece), cuda))
    cache.configure(config)
    got = [out[0] for _, _, out, _ in denoise(fn, model, kwargs_for, steps=7)]
    return got, want, runner, cuda, cache


@pytest.mark.parametrize("policy, late", [("block", False), ("attention", False), ("dynamic", False),
                                          ("forecast", False), ("block", True)])
def test_cache_policy_replays_each_piece_as_its_own_graph(policy, late):
    """cuda_graphs True with a cache policy: the runner picks the pieces on the host each step and each piece
    replays its own graph; the graphs share one memory pool, and pieces with the same inputs (the blocks) read
    them from the same buffers and write their outputs to the same buffers. Over a CFG denoising loop every output
    equals the same policy op by op: what a policy keeps across steps and branches (residuals, attention outputs)
    is never a buffer that another replay overwrites. Also where the policy is configured after the compile (a
    whole-forward graph would replay every block and ignore it)."""
    got, want, runner, cuda, cache = per_piece_loop(policy, late)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    wrapped = list(runner.compiled.values())
    assert cache.stats["skipped"] > 0 and all(isinstance(w, CudaGraphForward) and not w.auto for w in wrapped)
    assert cuda.captures == len(wrapped) and len({w.shared for w in wrapped}) == len(cuda.pools) == 1
    assert cuda.streams == 1  # one warm-up stream: cuBLAS keeps a workspace per stream
    read, written = {}, {}  # per signature of the inputs (outputs): the buffers each piece's graph reads (writes)
    for w in wrapped:
        for key, entry in w.captured.items():
            inputs = [entry.inputs[i] for i in w.dynamic if isinstance(entry.inputs[i], torch.Tensor)]
            outputs = [t for t in entry.outputs if isinstance(t, torch.Tensor)]
            read.setdefault(key, []).append(tuple(map(id, inputs)))
            written.setdefault(tuple((t.shape, t.dtype) for t in outputs), []).append(tuple(map(id, outputs)))
    for buffers in (read, written):
        assert max(len(pieces) for pieces in buffers.values()) >= 3  # the blocks
        assert all(len(set(pieces)) == 1 for pieces in buffers.values())


@pytest.mark.parametrize("gpu_bound", [False, True])
def test_auto_judges_each_piece_under_a_cache_policy(gpu_bound):
    """"auto" with a cache policy: each piece is timed on its own. Pieces whose host bounds them (50 ms to issue,
    nothing replayed) are captured and kept; where the GPU bounds them (300 ms after the host is done) none is
    captured. The outputs equal op by op either way. (Times far apart: a shared 2-core CI machine.)"""
    got, want, runner, cuda, _ = per_piece_loop("block", auto=True, host_s=0.05, gpu_s=0.3 if gpu_bound else 0.0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    wrapped = list(runner.compiled.values())
    kept = [entry for w in wrapped for entry in w.captured.values() if entry is not None]
    assert all(w.auto for w in wrapped)
    if gpu_bound:
        assert cuda.captures == 0 and not kept
    else:
        assert cuda.captures == len(wrapped) == len(kept)


def test_replayed_outputs_are_copies_in_any_container():
    """What a replay returns must outlive the next replay, which rewrites the graph's static outputs: tensors are
    copied inside lists, tuples and dicts alike, other values passed through."""
    from mindiesd_compile.runtime.cuda_graph import _clone
    static = torch.randn(3)
    before = static.clone()
    out = _clone(({"sample": static, "steps": 2}, [static]))
    static.add_(1)
    for copy in (out[0]["sample"], out[1][0]):
        assert copy is not static and torch.equal(copy, before)
    assert out[0]["steps"] == 2

"""torchair on a CPU machine: the real Python of torchair, from the torch-npu wheel, with test doubles for
what needs an Ascend machine. Kept under tests/ only; nothing here ships.

- The wheel is downloaded (``pip download``, never installed: an installed torch_npu breaks ``import
  torch`` without CANN) and only ``torch_npu/dynamo/torchair`` is unpacked into a cache folder.
- ``torchair.core._torchair`` (C++, linked against CANN) is replaced by ``_CoreDouble``: enough for
  torchair to import, build and serialise GE graphs; ``export`` keeps the serialised ModelDef so tests
  can parse it. Loading or running a GE graph is impossible here: tests run the converted FX graph
  with torchair's own ``debug.run_eagerly`` instead.
- torch_npu's fused ops are declared from their schemas in the wheel, with CPU kernels that follow
  torch_npu's documented semantics (layouts, ``atten_mask`` True = masked out, rotary modes), so a
  wrong argument in our legalisation gives a wrong number in a test.
- torch_npu itself is never imported (it needs CANN): torchair then takes its no-torch_npu paths, e.g.
  it emits HcomAllToAllV with equal counts where CANN >= 8.2 would get HcomAllToAll.
"""
from __future__ import annotations

import enum
import os
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import torch

CACHE = Path(os.environ.get("MINDIESD_TEST_CACHE", Path.home() / ".cache" / "mindiesd_compile"))
PREFIX = "torch_npu/dynamo/torchair/"


def _unpacked_torchair() -> Path:
    version = torch.__version__.split("+")[0]
    root = CACHE / f"torch_npu-{version}-py{sys.version_info.major}{sys.version_info.minor}"
    if (root / "torch_npu/dynamo/torchair/__init__.py").exists():
        return root / "torch_npu/dynamo"
    wheels = root.with_suffix(".wheel")
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    f"torch-npu=={version}", "-d", str(wheels)], check=True)
    wheel = next(wheels.glob("torch_npu-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(root, [n for n in z.namelist() if n.startswith(PREFIX) and not n.endswith(".so")])
    return root / "torch_npu/dynamo"


class _CoreDouble(types.ModuleType):
    """Stands in for ``torchair.core._torchair``."""

    class TorchDataType(enum.IntEnum):
        BOOL, UINT8, INT8, INT16, INT32, INT64, BF16, FLOAT16, FLOAT32, FLOAT64, COMPLEX64, COMPLEX128, \
            UINT16, UINT32, UINT64 = range(15)

    class TorchNpuGraphBase:
        def __init__(self, name=""):
            self.name = name

        def load(self, *args, **kwargs):
            raise RuntimeError("a GE graph can only be loaded on an Ascend machine (the C++ core is a test double)")

    exported = []  # (serialised ModelDef bytes, options) of every torchair export in this process

    def __init__(self):
        super().__init__("torchair.core._torchair")

    @staticmethod
    def check_cann_compat(*args):
        return ""

    @staticmethod
    def get_registered_ir_def(op_type):
        return "SUCCESS", [], [], []

    def export(self, model_def: bytes, options):
        self.exported.append((model_def, dict(options)))
        Path(options["export_path_dir"], options["export_name"]).write_bytes(model_def)  # where CANN writes the .air

    def __getattr__(self, name):  # InitializeGraphEngine, SetDebugLogPath, ...: nothing to do here
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def _declare_npu_ops():
    """The torch_npu fused ops our legalisation emits, with CPU kernels per torch_npu's documentation."""
    lib = torch.library.Library("npu", "FRAGMENT")
    lib.define("npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, str input_layout, "
               "Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., "
               "float keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647, "
               "int inner_precise=0, int[]? prefix=None, int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, "
               "int sparse_mode=0, bool gen_mask_parallel=True, bool sync=False) "
               "-> (Tensor, Tensor, Tensor, Tensor, int, int, int)")
    lib.define("npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)")
    lib.define("npu_rotary_mul(Tensor self, Tensor r1, Tensor r2, str rotary_mode='half', Tensor? rotate=None) -> Tensor")

    def fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, *args, **kwargs):
        assert pse is None and padding_mask is None and keep_prob == 1.0
        to_bnsd = {"BNSD": lambda t: t, "BSND": lambda t: t.transpose(1, 2),
                   "BSH": lambda t: t.unflatten(-1, (head_num, -1)).transpose(1, 2)}[input_layout]
        q, k, v = (to_bnsd(t) for t in (query, key, value))
        assert q.shape[1] == head_num, "head_num must be the number of query heads"
        keep = None if atten_mask is None else ~atten_mask.bool()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
        out = {"BNSD": out, "BSND": out.transpose(1, 2).contiguous(),
               "BSH": out.transpose(1, 2).flatten(-2)}[input_layout]
        stats = q.new_empty((q.shape[0], head_num, q.shape[2], 8), dtype=torch.float32)
        return out, stats, stats.clone(), q.new_empty(0), 0, 0, 0

    def rms_norm(x, gamma, epsilon=1e-6):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
        return (xf * rstd * gamma.float()).to(x.dtype), rstd

    def rotary_mul(x, r1, r2, rotary_mode="half", rotate=None):
        if rotary_mode == "half":
            a, b = x.chunk(2, dim=-1)
            rotated = torch.cat((-b, a), dim=-1)
        else:  # "interleave": pairs (x0, x1) -> (-x1, x0)
            pairs = x.unflatten(-1, (-1, 2))
            rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return x * r1 + rotated * r2

    for name, fn in (("npu_fusion_attention", fusion_attention), ("npu_rms_norm", rms_norm),
                     ("npu_rotary_mul", rotary_mul)):
        lib.impl(name, fn, "CompositeExplicitAutograd")
        torch.library.register_fake(f"npu::{name}", fn, lib=lib)
    return lib


_state = {}


def load():
    """Import the real torchair (Python) with the doubles in place; idempotent. Returns the module."""
    if "torchair" in _state:
        return _state["torchair"]
    sys.path.insert(0, str(_unpacked_torchair()))
    core = _CoreDouble()
    sys.modules["torchair.core._torchair"] = core
    _state["npu_lib"] = _declare_npu_ops()
    with warnings.catch_warnings():  # torchair warns about every torch_npu op it does not find
        warnings.simplefilter("ignore")
        import torchair
    from torchair._ge_concrete_graph.ge_converter.experimental import hcom_alltoall
    # torchair registers this op's kernel for the NPU only; the same Python (gloo) serves the CPU runs here.
    _state["a2a_lib"] = lib = torch.library.Library("npu_define", "FRAGMENT")
    lib.impl("all_to_all_single_npu", hcom_alltoall.npu_all_to_all_single_npu, "CPU")
    _state["torchair"], _state["core"] = torchair, core
    return torchair


def exported_model_defs():
    return _state["core"].exported

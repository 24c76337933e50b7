"""RoPE: rotary position embedding in the three forms the diffusers DiTs produce.

1. ``x * cos + rotate(x) * sin`` (Flux, HunyuanVideo, CogVideoX, SD3-family helpers): anchor the add of
   two products. Whether the second factor is a rotation of ``x`` is *decided by evaluation*: the
   view/unbind/stack/cat/neg chain from ``x`` to it is replayed on a one-row probe (all leading dims
   set to 1), and the result compared with the interleaved and the rotate-half rotation. This
   accepts every spelling of the rotation without enumerating them.
2. Wan's pairwise form: ``out[..., 0::2] = x1*cos - x2*sin; out[..., 1::2] = x1*sin + x2*cos``
   (two strided slice_scatters into an ``empty``), cos/sin given per pair (width D/2).
3. Qwen-Image's complex form: ``view_as_real(view_as_complex(x.reshape(..., D/2, 2)) * freqs)``.
Near-misses: a product whose partner is not a rotation of ``x``, a rotation that mixes rows.
"""
from __future__ import annotations

import operator

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..ops import _rotate, ops
from .base import (RESHAPES, FusionPass, aten, broadcasts_to, getitem, insert_call, is_call, is_tensor, prims,
                   require, replace, same_value, strip_upcasts, val)

# Ops a rotation may be spelled with; anything else on the path means "not a rotation of x".
ROTATION_OPS = {*RESHAPES, aten.unsqueeze.default,
                aten.squeeze.dim, aten.unbind.int, aten.neg.default, aten.cat.default, aten.stack.default,
                aten.slice.Tensor, aten.select.int, aten.clone.default, aten.permute.default,
                prims.convert_element_type.default, operator.getitem}
INF = 2 ** 62


def _rotation_kind(src, dst):
    """'interleaved' / 'half' if ``dst`` is that rotation of ``src`` along the last dim, else None."""
    order, seen = [], set()

    def visit(n):
        if n is src or n in seen:
            return True
        if not isinstance(n, torch.fx.Node) or n.target not in ROTATION_OPS:
            return False
        seen.add(n)
        ok = all(visit(a) for a in n.all_input_nodes)
        order.append(n)
        return ok

    if dst is src or not visit(dst):
        return None
    shape = tuple(val(src).shape)
    lead, width = len(shape) - 1, shape[-1]
    with unset_fake_temporarily():  # the probe is a real tensor, even inside a tracing fake mode
        return _probe_rotation(order, src, dst, lead, width, shape)


def _probe_rotation(order, src, dst, lead, width, shape):
    probe = torch.arange(1, width + 1, dtype=torch.float32).reshape((1,) * lead + (width,))

    def shrink(arg):  # a view's shape with the leading (token/head) dims set to 1
        if isinstance(arg, (list, tuple)) and all(isinstance(s, int) for s in arg):
            if tuple(arg[:lead]) != shape[:lead]:
                raise ValueError("rotation reshapes across rows")
            return [1] * lead + list(arg[lead:])
        return arg

    try:
        out = _replay(order, {src: probe}, shrink)[dst]
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(probe.shape):
        return None
    for kind, interleaved in (("interleaved", True), ("half", False)):
        if torch.equal(out, _rotate(probe, interleaved)):
            return kind
    return None


def _replay(order, env, shrink):
    for n in order:
        args = torch.fx.map_arg(n.args, lambda a: env[a])
        if n.target in RESHAPES:
            args = (args[0], shrink(args[1]))
        if n.target is prims.convert_element_type.default:
            args = (args[0], torch.float32)
        env[n] = n.target(*args, **torch.fx.map_arg(n.kwargs, lambda a: env[a]))
    return env


def _find_rotation(add):
    """(x, cos, sin, kind) if ``add`` is ``x * cos + rotate(x) * sin`` in any operand order, else None."""
    first_second = _products(add)
    for first, second in (first_second, first_second[::-1]):
        for x, cos in (first.args[:2], first.args[1::-1]):
            for rot, sin in (second.args[:2], second.args[1::-1]):
                kind = _rotation_kind(strip_upcasts(x), strip_upcasts(rot))
                if kind is not None:
                    return x, cos, sin, kind
    return None


def _products(node):
    a, b = node.args[:2]
    if is_call(a, aten.mul.Tensor) and is_call(b, aten.mul.Tensor) and all(is_tensor(t) for t in a.args[:2] + b.args[:2]):
        return a, b
    return None


def _stride2(node, start):
    """(base, src) of ``slice_scatter(base, src, -1, start, end, 2)``."""
    if not is_call(node, aten.slice_scatter.default):
        return None
    base, src, dim, s, end, step = (list(node.args) + [0, None, INF, 1][len(node.args) - 2:])[:6]
    if dim % val(base).dim() != val(base).dim() - 1 or s != start or step != 2:
        return None
    return base, src


class RoPEPass(FusionPass):
    name = "rope"

    def anchors(self, graph):
        self._rotations = {}  # add node -> (x, cos, sin, kind): the probe runs once per candidate
        out = []
        for n in graph.nodes:
            if is_call(n, aten.add.Tensor) and _products(n) and n.kwargs.get("alpha", 1) == 1:
                rotation = _find_rotation(n)
                if rotation is not None:
                    self._rotations[n] = rotation
                    out.append(n)
            elif _stride2(n, 1) and _stride2(_stride2(n, 1)[0], 0):
                out.append(n)
            elif is_call(n, aten.view_as_real.default) and is_call(n.args[0], aten.mul.Tensor):
                out.append(n)
        return out

    def rewrite(self, graph, anchor):
        if is_call(anchor, aten.add.Tensor):
            self._rewrite_rotate(graph, anchor)
        elif is_call(anchor, aten.slice_scatter.default):
            self._rewrite_pairwise(graph, anchor)
        else:
            self._rewrite_complex(graph, anchor)

    def _rewrite_rotate(self, graph, add):
        x, cos, sin, kind = self._rotations[add]
        shape = tuple(val(x).shape)
        require(broadcasts_to(cos, shape) and broadcasts_to(sin, shape), "cos/sin do not broadcast to x")
        require(tuple(val(add).shape) == shape, "rotary output is broadcast beyond x")
        fused = insert_call(graph, add, ops.rope.default, (x, cos, sin, kind == "interleaved"), like=add)
        require(val(fused).dtype == val(add).dtype, "type promotion differs from the unfused rotary")
        replace(add, fused)

    def _rewrite_pairwise(self, graph, outer):
        inner, odd = _stride2(outer, 1)
        empty, even = _stride2(inner, 0)
        even, odd = (_copied(t) for t in (even, odd))
        require(is_call(even, aten.sub.Tensor) and is_call(odd, aten.add.Tensor), "not the x1*cos - x2*sin / x1*sin + x2*cos pair")
        require(_products(even) is not None and _products(odd) is not None, "pair halves are not products")
        x1x2 = _pair_halves(_products(even)[0])
        require(x1x2 is not None, "strided halves do not come from unbinding x's pairs")
        x, x1, x2 = x1x2
        cos = other(_products(even)[0], x1)
        sin = other(_products(even)[1], x2)
        require(cos is not None and sin is not None and _products(even)[1].args[:2] in ((x2, sin), (sin, x2)),
                "even half is not x1*cos - x2*sin")
        p1, p2 = _products(odd)
        ok_odd = ((_is_product(p1, x1, sin) and _is_product(p2, x2, cos))
                  or (_is_product(p1, x2, cos) and _is_product(p2, x1, sin)))
        require(ok_odd, "odd half is not x1*sin + x2*cos")
        require(2 * val(cos).shape[-1] == val(x).shape[-1] or val(cos).shape[-1] == 1, "cos/sin are not per pair")
        fused = insert_call(graph, outer, ops.rope.default, (x, cos, sin, True), like=outer)
        if val(fused).dtype != val(outer).dtype:
            fused = insert_call(graph, outer, prims.convert_element_type.default, (fused, val(outer).dtype), like=outer)
        require(tuple(val(fused).shape) == tuple(val(outer).shape), "rotary output shape differs")
        replace(outer, fused)

    def _rewrite_complex(self, graph, as_real):
        mul = as_real.args[0]
        a, b = mul.args[:2]
        xc, freqs = (a, b) if is_call(a, aten.view_as_complex.default) else (b, a)
        require(is_call(xc, aten.view_as_complex.default) and is_tensor(freqs), "complex product is not x * freqs")
        pairs = xc.args[0]
        require(is_call(pairs, *RESHAPES), "x is not reshaped into pairs")
        x = pairs.args[0]
        shape = tuple(val(x).shape)
        require(tuple(val(pairs).shape) == shape[:-1] + (shape[-1] // 2, 2), "x is not reshaped into (D/2, 2) pairs")
        views = list(as_real.users)
        require(len(views) == 1 and is_call(views[0], *RESHAPES)
                and tuple(val(views[0]).shape) == shape, "rotated pairs are not flattened back to x's shape")
        require(tuple(torch.broadcast_shapes(tuple(val(xc).shape), tuple(val(freqs).shape))) == tuple(val(xc).shape),
                "freqs do not broadcast to x")
        end = views[0]
        as_pairs = insert_call(graph, end, aten.view_as_real.default, (freqs,), like=end)
        cos = insert_call(graph, end, aten.select.int, (as_pairs, -1, 0), like=end)
        sin = insert_call(graph, end, aten.select.int, (as_pairs, -1, 1), like=end)
        fused = insert_call(graph, end, ops.rope.default, (x, cos, sin, True), like=end)
        require(val(fused).dtype == val(end).dtype, "type promotion differs from the complex product")
        replace(end, fused)


def _copied(node):
    """``copy(dst, src)`` into a strided slice writes ``src`` (cast to dst's dtype)."""
    return node.args[1] if is_call(node, aten.copy.default) else node


def _pair_halves(product):
    """(x, x1, x2) if a factor of ``product`` is x1 = unbind(x.view(..., D/2, 2), -1)[0]."""
    for t in product.args[:2]:
        if t.target is getitem and is_call(t.args[0], aten.unbind.int) and t.args[1] == 0:
            unbind = t.args[0]
            pairs = unbind.args[0]
            dim = unbind.args[1] if len(unbind.args) > 1 else 0
            if is_call(pairs, *RESHAPES) and dim % val(pairs).dim() == val(pairs).dim() - 1 \
                    and val(pairs).shape[-1] == 2:
                second = [u for u in unbind.users if u.target is getitem and u.args[1] == 1]
                if len(second) == 1:
                    return pairs.args[0], t, second[0]
    return None


def _is_product(product, a, b) -> bool:
    """``product`` multiplies ``a`` and ``b`` (either order; equal slices count as the same factor)."""
    u, v = product.args[:2]
    return (same_value(u, a) and same_value(v, b)) or (same_value(u, b) and same_value(v, a))


def other(product, factor):
    a, b = product.args[:2]
    return b if a is factor else a if b is factor else None

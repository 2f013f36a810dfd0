"""The expert GEMMs of the matcher: the grouped or batched matmuls over 3-D expert weights.

:func:`_find_gemms` lists every GEMM whose one operand is an expert weight (a 3-D ``[E, N, K]``
placeholder, a 2-D ``[E*N, K]`` parameter viewed per expert, or one 2-D parameter per expert
stacked); :func:`_expert_gemms` reads a block's pair of them (up, down) with a separate up
projection, biases and per-expert lists; :func:`_dispatch_kind` and :func:`_layout` describe
how the weights are stored. Refusals raise :class:`.region.NoMatch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .fx_utils import call_name, is_op, tensor_meta
from .region import NoMatch, _is_param, _strip

__all__ = ["GEMM_OPS"]


GEMM_OPS = ("_grouped_mm", "grouped_mm", "grouped_mm_fallback", "bmm", "matmul")


# ops a weight goes through between its placeholder and a GEMM
_WEIGHT_VIEW_OPS = ("transpose", "t", "to", "contiguous", "type", "float", "bfloat16", "half", "getitem")


# ops that turn a 2-D [E*N, K] parameter into the [E, N, K] expert view (DBRX)
_EXPERT_VIEW_OPS = ("view", "reshape", "_unsafe_view")


_INPLACE_ADD = ("method:add_", "operator.iadd")


def _weight_source(arg) -> tuple[fx.Node, bool, bool, tuple | None] | None:
    """(expert weight placeholder, went through a transpose, was indexed by ids, the
    [E, N, K] view of a 2-D placeholder or None) for a GEMM operand."""
    transposed = indexed = False
    view = None
    node = arg
    while isinstance(node, fx.Node) and node.op != "placeholder":
        if is_op(node, "stack") and _stacked_params(node) is not None:
            break     # one 2-D parameter per expert, stacked (ModuleDict experts): the stack stands for them
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        if is_op(node, *_EXPERT_VIEW_OPS) and view is None:
            inner, out = tensor_meta(node.args[0]), tensor_meta(node)
            if (node.args[0].op != "placeholder" or not _is_param(node.args[0]) or inner is None
                    or out is None or inner.dim() != 2
                    or out.dim() != 3 or inner.numel() != out.numel() or out.shape[-1] != inner.shape[-1]):
                return None
            view = tuple(int(d) for d in out.shape)
        elif not is_op(node, *_WEIGHT_VIEW_OPS):
            return None
        if is_op(node, "transpose", "t"):
            transposed = not transposed
        if is_op(node, "getitem"):
            indexed = True
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return None
    v = tensor_meta(node)
    if v is None or not v.is_floating_point() or v.dim() != (2 if view is not None else 3):
        return None
    return node, transposed, indexed, view


def _stacked_params(node: fx.Node) -> list[fx.Node] | None:
    """The per-expert 2-D parameter placeholders of ``torch.stack([...], dim=0)``, or None."""
    members = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim != 0 or not isinstance(members, (list, tuple)) or len(members) < 2:
        return None
    for m in members:
        v = tensor_meta(m) if isinstance(m, fx.Node) else None
        if v is None or m.op != "placeholder" or not _is_param(m) or v.dim() != 2 or not v.is_floating_point():
            return None
    return list(members)


@dataclass
class _Gemm:
    node: fx.Node
    weight: fx.Node
    weight_transposed_view: bool   # the op saw weight.transpose(-2, -1)
    activation_operand: fx.Node
    weight_is_left: bool           # bmm(W, x): W @ x
    view: tuple | None = None      # [E, N, K] view of a 2-D [E*N, K] parameter


def _find_gemms(graph: fx.Graph) -> list[_Gemm]:
    gemms = []
    for n in graph.nodes:
        if not is_op(n, *GEMM_OPS) or len(n.args) < 2:
            continue
        a, b = n.args[0], n.args[1]
        src_b, src_a = _weight_source(b), _weight_source(a)
        if src_b is not None and isinstance(a, fx.Node):
            gemms.append(_Gemm(n, src_b[0], src_b[1], a, False, src_b[3]))
        elif src_a is not None and isinstance(b, fx.Node):
            gemms.append(_Gemm(n, src_a[0], src_a[1], b, True, src_a[3]))
    return gemms


def _gemm_output(g: _Gemm) -> fx.Node:
    """The [S, N] result of a GEMM (bmm results are [S, 1, N] squeezed back)."""
    node = g.node
    users = list(node.users)
    if is_op(node, "bmm", "matmul") and len(users) == 1 and is_op(users[0], "squeeze", "view", "reshape"):
        return users[0]
    return node


def _gemm_input(g: _Gemm) -> fx.Node:
    """The [S, K] activation rows fed to a GEMM (bmm's unsqueeze removed)."""
    x = g.activation_operand
    if is_op(x, "unsqueeze", "view", "reshape") and isinstance(x.args[0], fx.Node):
        v, inner = tensor_meta(x), tensor_meta(x.args[0])
        if v is not None and inner is not None and v.dim() == inner.dim() + 1:
            return x.args[0]
    return x


def _bias_of(out: fx.Node, region: set[fx.Node]) -> tuple[fx.Node | None, set[fx.Node]]:
    """An in-place ``out += bias_param[ids]`` on a GEMM result: (bias placeholder, nodes)."""
    bias, nodes = None, set()
    for u in out.users:
        if u in region and call_name(u) in _INPLACE_ADD and u.args[0] is out:
            sel = u.args[1]
            if isinstance(sel, fx.Node) and is_op(sel, "getitem") and isinstance(sel.args[0], fx.Node):
                src = _strip(sel.args[0], ("to", "type"))
                v = tensor_meta(src)
                if src.op == "placeholder" and v is not None and v.dim() == 2:
                    if bias is not None:
                        raise NoMatch("two bias additions on one expert projection")
                    bias, nodes = src, {u, sel}
                    continue
            raise NoMatch(f"in-place add on an expert projection that is not a per-expert bias ({u.name})")
    return bias, nodes


def _up_t(g: _Gemm) -> bool:
    """Whether the stored up weight is [in, out] per expert (see ``_match_pair``)."""
    return (not g.weight_is_left) if is_op(g.node, "bmm", "matmul") else (not g.weight_transposed_view)


def _shape(g: _Gemm) -> tuple:
    return g.view if g.view is not None else tuple(tensor_meta(g.weight).shape)


def _second_up(up: _Gemm, down: _Gemm, region: set[fx.Node], gemms: list[_Gemm]) -> _Gemm | None:
    """A second expert GEMM on the same rows as ``up`` (separate gate and up weights)."""
    def source(g):   # grouped_mm casts its input per call: the same rows, two .to() nodes
        return _strip(_gemm_input(g), ("to", "contiguous", "type"))

    rows = source(up)
    for g in gemms:
        if g is up or g is down or g.node not in region or g.weight is up.weight:
            continue
        if source(g) is rows and g.node.target is up.node.target and g.weight_is_left == up.weight_is_left:
            return g
    return None


@dataclass
class _ExpertGemms:
    """The expert projections of one block as the graph holds them."""

    up: _Gemm
    down: _Gemm
    up2: _Gemm | None               # a separate up projection (the first one is then the gate)
    up_shape: tuple
    down_shape: tuple
    up_out: fx.Node
    down_out: fx.Node
    up_bias: fx.Node | None
    down_bias: fx.Node | None
    bias_nodes: set[fx.Node]        # the in-place bias additions (not part of any extracted function)
    lists: dict[str, list[fx.Node]]   # name -> one 2-D parameter per expert (stacked in the graph)
    params: set[fx.Node]            # every placeholder holding expert weights

    @property
    def num_experts(self) -> int:
        return self.down_shape[0]


def _expert_gemms(up: _Gemm, down: _Gemm, region: set[fx.Node], gemms: list[_Gemm]) -> _ExpertGemms:
    """The expert weights, biases and separate up projection of the (up, down) pair."""
    up2 = _second_up(up, down, region, gemms)
    up_shape, down_shape = _shape(up), _shape(down)
    if up2 is not None and (_shape(up2) != up_shape or up2.weight_transposed_view != up.weight_transposed_view):
        raise NoMatch("the two up projections (gate and up) have different shapes or layouts")
    if up_shape[0] < down_shape[0]:
        raise NoMatch("up and down expert weights disagree on the number of experts")
    # more up rows than down rows: rows for identity ("zero") experts that never run
    # their weights (LongCat-Flash); the ids the experts see must stay below E, which
    # the block check confirms on real inputs and grouped_gemm checks at every call
    up_out, down_out = _gemm_output(up), _gemm_output(down)
    b_up, up_bias_nodes = _bias_of(up_out, region)
    b_down, down_bias_nodes = _bias_of(down_out, region)
    params = {up.weight, down.weight, b_up, b_down} | ({up2.weight} if up2 is not None else set())
    lists = {name: _stacked_params(g.weight) for name, g in (("up", up), ("down", down))
             if is_op(g.weight, "stack")}
    if lists and (up2 is not None or len(lists) != 2):
        raise NoMatch("only some expert weights are per-expert tensors")
    params |= {m for members in lists.values() for m in members}
    return _ExpertGemms(up, down, up2, up_shape, down_shape, up_out, down_out, b_up, b_down,
                        up_bias_nodes | down_bias_nodes, lists, params)


def _dispatch_kind(experts: _ExpertGemms, prescale: bool) -> tuple[bool, bool, str]:
    """(up stored [in, out], down stored [in, out], the dispatch's description)."""
    up, down = experts.up, experts.down
    if up.node.target is not down.node.target:
        raise NoMatch("the two projections use different matmul kinds")
    if is_op(up.node, "bmm", "matmul"):
        up_t, down_t = not up.weight_is_left, not down.weight_is_left
        dispatch = "batched_mm (bmm over gathered expert weights)"
    else:
        up_t, down_t = not up.weight_transposed_view, not down.weight_transposed_view
        dispatch = "grouped_mm" if "fallback" not in call_name(up.node) else "grouped_mm_fallback"
    if prescale:
        dispatch += ", routing weight on the input rows"
    return up_t, down_t, dispatch


def _layout(experts: _ExpertGemms, up_t: bool, down_t: bool) -> str:
    up_shape, down_shape, n = experts.up_shape, experts.down_shape, experts.num_experts
    return (f"up {list(up_shape)}{' transposed' if up_t else ''}"
            f"{f' (first {n} used)' if up_shape[0] > n else ''}, down {list(down_shape)}"
            f"{' transposed' if down_t else ''}"
            + (", biases" if experts.up_bias is not None or experts.down_bias is not None else "")
            + (", gate and up separate" if experts.up2 is not None else "")
            + (", viewed from 2-D [E*N, K] parameters" if any(g.view for g in (experts.up, experts.down)) else "")
            + (", one module per expert" if experts.lists else ""))

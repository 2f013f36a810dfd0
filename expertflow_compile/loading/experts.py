"""Which parameters of a Hugging Face model are routed experts, and how the engine names them.

:func:`find_expert_groups` walks the (meta-device) model once and returns one
:class:`ExpertGroup` per MoE layer: the parameters the expertflow backend serves from
its expert cache, each under the engine's tensor name (``up``, ``down``, ``up_bias``,
``down_bias``, ``up2``). The layouts known here are exactly the ones the backend's
matcher recognises (``passes/match.py`` and the loop-free forms of ``traceable.py``):

* stacked ``[E, ...]`` parameters of an experts module: ``gate_up_proj`` or ``up_proj``,
  ``down_proj``, optional ``*_bias`` ``[E, N]``; ``gate_up_proj`` may hold rows past E
  (LongCat-Flash's identity experts: never computed, never read);
* JetMoE's ``input_linear.weight`` / ``output_linear.weight`` ``[E, ...]`` of the MoE MLP;
* DBRX's 2-D ``w1`` / ``v1`` / ``w2`` ``[E * I, H]`` (each expert a block of ``I`` rows;
  ``w1`` is the gate, served as ``up``; ``v1`` as ``up2``);
* one module per expert (Switch Transformers' ``experts.expert_<e>.wi`` / ``wo``).

Never experts: anything under a ``shared`` module (shared experts run on every token,
also when stored batched as ``[1, ...]``, Inkling) or under an attention module
(JetMoE's mixture of attention heads is not offloaded). Layer numbers come from the
module path (``layers.<n>``, ``blocks.<n>``, ...), made unique in module order
(encoder and decoder stacks count apart).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..layer import layer_index

__all__ = ["ExpertGroup", "find_expert_groups", "NotServed"]


class NotServed(ValueError):
    """The model has routed experts expertflow does not serve (the message says why)."""


@dataclass
class ExpertGroup:
    """The routed experts of one MoE layer."""

    layer: int
    module: str                                   # the module holding them (for messages and hooks)
    num_experts: int
    params: dict[str, str | list[str]]            # engine name -> parameter name (list: one per expert)
    rows: dict[str, int] = field(default_factory=dict)   # engine name -> rows per expert of a 2-D [E*N, K] param

    def param_names(self) -> list[str]:
        out = []
        for v in self.params.values():
            out.extend(v if isinstance(v, list) else [v])
        return out


# modules whose experts the backend does not rewrite (left untouched, run in transformers' loop):
# loading them from disk would leave them computing with placeholders
_UNSERVED = {
    "NllbMoeExperts": "the backend leaves NLLB-MoE's per-expert loop untouched (transformers 5.24's loop "
                      "one-hot-encodes its top-1 mask twice and runs only experts 0 and 1; see the README's "
                      "coverage section), so its experts cannot be served from disk",
}
_SKIP_COMPONENT = re.compile(r"shared|attn|attention", re.I)


def _skipped(path: str) -> bool:
    return any(_SKIP_COMPONENT.search(part) for part in path.split(".") if part)


def _config_num_experts(config) -> int | None:
    cfgs = [config]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        cfgs.append(text())
    for c in cfgs:
        for sub in (c, getattr(c, "ffn_config", None)):
            if sub is None:
                continue
            for attr in ("moe_num_experts", "num_local_experts", "n_routed_experts", "num_experts"):
                v = getattr(sub, attr, None)
                if isinstance(v, int) and v > 0:
                    return v
    return None


def _stacked(mod, mname: str) -> tuple[dict, int] | None:
    own = dict(mod.named_parameters(recurse=False))
    up_name = "gate_up_proj" if "gate_up_proj" in own else "up_proj" if "up_proj" in own else None
    down = own.get("down_proj")
    if up_name is None or down is None or own[up_name].dim() != 3 or down.dim() != 3:
        return None
    num = down.shape[0]
    if own[up_name].shape[0] < num:
        return None
    params = {"up": f"{mname}.{up_name}", "down": f"{mname}.down_proj"}
    for pname, engine_name in ((f"{up_name}_bias", "up_bias"), ("down_proj_bias", "down_bias")):
        b = own.get(pname)
        if b is not None and b.dim() == 2:
            params[engine_name] = f"{mname}.{pname}"
    return params, num


def _jetmoe(mod, mname: str) -> tuple[dict, int] | None:
    kids = dict(mod.named_children())
    i, o = kids.get("input_linear"), kids.get("output_linear")
    if i is None or o is None:
        return None
    wi, wo = getattr(i, "weight", None), getattr(o, "weight", None)
    if not (isinstance(wi, torch.Tensor) and isinstance(wo, torch.Tensor) and wi.dim() == 3 and wo.dim() == 3
            and wi.shape[0] == wo.shape[0]):
        return None
    return {"up": f"{mname}.input_linear.weight", "down": f"{mname}.output_linear.weight"}, wi.shape[0]


def _dbrx(mod, mname: str, config) -> tuple[dict, int, dict] | None:
    own = dict(mod.named_parameters(recurse=False))
    if not {"w1", "v1", "w2"} <= set(own) or any(own[n].dim() != 2 for n in ("w1", "v1", "w2")):
        return None
    num = _config_num_experts(config)
    if not num or own["w1"].shape[0] % num:
        return None
    rows = own["w1"].shape[0] // num
    params = {"up": f"{mname}.w1", "up2": f"{mname}.v1", "down": f"{mname}.w2"}
    return params, num, {n: rows for n in params}


_PER_EXPERT_CHILD = re.compile(r"^(?:expert_)?(\d+)$")


def _listed(mod, mname: str) -> tuple[dict, int] | None:
    """One module per expert (Switch Transformers): children ``expert_<e>`` with up/down Linear."""
    kids = [(n, c) for n, c in mod.named_children() if _PER_EXPERT_CHILD.match(n)]
    if len(kids) < 2 or len(kids) != len(list(mod.children())):
        return None
    kids.sort(key=lambda kv: int(_PER_EXPERT_CHILD.match(kv[0]).group(1)))
    if [int(_PER_EXPERT_CHILD.match(n).group(1)) for n, _ in kids] != list(range(len(kids))):
        return None
    for up, down in (("wi", "wo"), ("fc1", "fc2"), ("up_proj", "down_proj")):
        if all(isinstance(getattr(c, up, None), torch.nn.Linear) and isinstance(getattr(c, down, None), torch.nn.Linear)
               for _, c in kids):
            params = {"up": [f"{mname}.{n}.{up}.weight" for n, _ in kids],
                      "down": [f"{mname}.{n}.{down}.weight" for n, _ in kids]}
            if all(getattr(c, up).bias is not None for _, c in kids):
                params["up_bias"] = [f"{mname}.{n}.{up}.bias" for n, _ in kids]
            if all(getattr(c, down).bias is not None for _, c in kids):
                params["down_bias"] = [f"{mname}.{n}.{down}.bias" for n, _ in kids]
            return params, len(kids)
    return None


def find_expert_groups(model: torch.nn.Module) -> list[ExpertGroup]:
    """One :class:`ExpertGroup` per MoE layer of ``model`` (see the module docstring).
    Raises :class:`NotServed` for experts the backend leaves untouched."""
    groups: list[ExpertGroup] = []
    claimed: set[str] = set()
    for mname, mod in model.named_modules():
        if not mname or _skipped(mname) or any(mname.startswith(c + ".") for c in claimed):
            continue
        cls = type(mod).__name__
        if cls in _UNSERVED:
            raise NotServed(f"{mname} ({cls}): {_UNSERVED[cls]}; load this model with "
                            "transformers.AutoModel*.from_pretrained and compile it in memory")
        rows: dict[str, int] = {}
        found = _stacked(mod, mname) or _jetmoe(mod, mname)
        if found is None:
            d = _dbrx(mod, mname, model.config)
            if d is not None:
                found, rows = d[:2], d[2]
        if found is None and (mname.rsplit(".", 1)[-1] == "experts" or cls.endswith("Experts")):
            found = _listed(mod, mname)
        if found is None:
            continue
        params, num = found
        groups.append(ExpertGroup(layer=-1, module=mname, num_experts=int(num), params=params, rows=rows))
        claimed.add(mname)
    taken: set[int] = set()
    for g in groups:
        n = layer_index(g.module)
        n = 0 if n is None else n
        while n in taken:
            n += 1
        g.layer = n
        taken.add(n)
    return groups

"""What the backend did to each graph, in a form people and tests can read."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BlockReport", "GraphReport", "ExplainReport", "PassTiming"]


@dataclass
class BlockReport:
    """One MoE layer found in a graph: rewritten, or left untouched with the reason."""

    layer: int | None
    where: str
    rewritten: bool
    reason: str = ""
    routing: str = ""
    dispatch: str = ""
    layout: str = ""
    activation: str = ""
    num_experts: int = 0
    top_k: int = 0
    params: list[str] = field(default_factory=list)
    check: str = ""

    def line(self) -> str:
        head = f"layer {self.layer if self.layer is not None else '?'}"
        if not self.rewritten:
            return f"  {head}: left untouched ({self.where}): {self.reason}"
        return (f"  {head}: rewritten  experts={self.num_experts} top_k={self.top_k}\n"
                f"      routing    {self.routing}\n"
                f"      dispatch   {self.dispatch} -> expertflow permute + grouped_gemm\n"
                f"      experts    {self.layout}; gating: {self.activation}\n"
                f"      params     {', '.join(self.params)}\n"
                f"      check      {self.check}")


@dataclass(frozen=True)
class PassTiming:
    """One pass of the pipeline on one graph: its name, the blocks it left, its time."""

    name: str
    blocks: int
    ms: float


@dataclass
class GraphReport:
    index: int
    blocks: list[BlockReport] = field(default_factory=list)
    code: str = ""
    num_nodes: int = 0
    passes: list[PassTiming] = field(default_factory=list)   # in the order they ran

    @property
    def rewritten(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.rewritten]

    @property
    def untouched(self) -> list[BlockReport]:
        return [b for b in self.blocks if not b.rewritten]


@dataclass
class ExplainReport:
    """Everything the backend saw across the graphs of one model call."""

    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def blocks(self) -> list[BlockReport]:
        """Rewritten MoE blocks, in graph order."""
        return [b for g in self.graphs for b in g.rewritten]

    @property
    def untouched(self) -> list[BlockReport]:
        return [b for g in self.graphs for b in g.untouched]

    @property
    def matched_layers(self) -> list[int]:
        return [b.layer for b in self.blocks]

    @property
    def code(self) -> str:
        return "\n\n".join(f"# graph {g.index}\n{g.code}" for g in self.graphs)

    def __str__(self) -> str:
        lines = [f"expertflow: {len(self.graphs)} graph(s), {len(self.blocks)} MoE block(s) rewritten, "
                 f"{len(self.untouched)} left untouched"]
        for g in self.graphs:
            lines.append(f"graph {g.index}: {g.num_nodes} nodes, {len(g.rewritten)} rewritten, "
                         f"{len(g.untouched)} untouched")
            lines.extend(b.line() for b in g.blocks)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ExplainReport(graphs={len(self.graphs)}, blocks={len(self.blocks)}, untouched={len(self.untouched)})"

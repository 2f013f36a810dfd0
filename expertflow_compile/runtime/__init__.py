"""The expertflow runtime: host store, budgeted device cache, prefetcher, stats.

No FX/graph code lives here; the custom ops in ``expertflow_compile.compiler.ops`` call it.
"""

from .budget import Budget, format_bytes, parse_budget
from .cache import VALID_POLICIES, ExpertCache
from .stats import RuntimeStats
from .store import (
    ExpertSpec,
    ExpertStore,
    FaultInjectingStore,
    SafetensorsExpertStore,
    TensorEntry,
    TensorExpertStore,
    TensorSource,
    safetensors_index,
)

__all__ = [
    "Budget",
    "ExpertCache",
    "ExpertSpec",
    "ExpertStore",
    "FaultInjectingStore",
    "RuntimeStats",
    "SafetensorsExpertStore",
    "TensorEntry",
    "TensorExpertStore",
    "TensorSource",
    "VALID_POLICIES",
    "format_bytes",
    "parse_budget",
    "safetensors_index",
]

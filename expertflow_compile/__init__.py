"""expertflow-compile: run Mixture-of-Experts models whose experts do not fit on the device.

``model.compile(backend="expertflow", options={"expert_budget": "25%"})`` rewrites
every MoE block of a Hugging Face model into predict -> prefetch -> permute ->
grouped-GEMM nodes served by an expert cache. See the README.
"""

from .api import explain, reset_stats, stats
from .compiler.backend import expertflow_backend
from .config import ExpertFlowConfig
from .errors import InferenceOnlyError, OptionError
from .loading import from_pretrained
from .runtime.trace import record_routing

__all__ = ["explain", "stats", "reset_stats", "expertflow_backend", "ExpertFlowConfig", "OptionError",
           "InferenceOnlyError", "from_pretrained", "record_routing"]
__version__ = "0.1.0"

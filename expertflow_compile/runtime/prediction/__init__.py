"""Expert prediction: which experts the coming MoE layers will use.

Imports nothing of the engine: predictors see the compiled model through a
:class:`~.common.ModelView` and hand back :class:`~.common.Ranked` experts per layer
(``predict(view, layer, hidden)``); the engine turns them into prefetches and keeps its
own precision/recall accounting.

* ``lookahead`` - :class:`~.lookahead.LookaheadPredictor`: the coming layers' routers on
  the current hidden state (no training).
* ``path`` - :class:`~.path.PathPredictor`: ExpertFlow's routing-path predictor, trained
  on recorded routing (:func:`~.path.train_path_predictor`).
* ``oracle`` - :class:`~.oracle.OraclePredictor`: replays a recorded trace.

:func:`make_predictor` builds the one a config names, checked against the model.
"""

from __future__ import annotations

import logging

from .common import LAYER_SHIFT, ModelView, Ranked, cap, decode, encode, ranked_votes
from .lookahead import LookaheadPredictor
from .oracle import OraclePredictor
from .path import PathPredictor, path_features, prediction_metrics, train_path_predictor, view_router_digest

__all__ = ["LAYER_SHIFT", "ModelView", "Ranked", "ranked_votes", "encode", "decode", "cap", "LookaheadPredictor",
           "PathPredictor", "OraclePredictor", "make_predictor", "train_path_predictor", "path_features",
           "prediction_metrics", "view_router_digest"]

log = logging.getLogger("expertflow_compile")


def make_predictor(config, view: ModelView):
    """The predictor ``config.predictor`` names (``lookahead``, ``path``, ``oracle``), loaded
    from ``config.predictor_path`` and checked against the compiled model ``view``
    (``ValueError`` naming the file when it was made for another model)."""
    if config.predictor == "lookahead":
        return LookaheadPredictor()
    if config.predictor == "path":
        return PathPredictor.load(config.predictor_path, view=view)
    if config.predictor == "oracle":
        from ..trace import RoutingTrace

        path = config.predictor_path
        trace = RoutingTrace.load(path)
        layers = {l: view.num_experts[l] for l in view.order}
        bad = [l for l in layers if l not in trace.num_experts or trace.num_experts[l] != layers[l]]
        if bad:
            raise ValueError(f"the routing trace {path!r} (model fingerprint {trace.fingerprint[:16]}...) "
                             f"does not match the compiled model's MoE layers {layers}")
        digest = view_router_digest(view)
        recorded = trace.meta.get("router_digest")
        if digest is not None and not recorded:
            raise ValueError(f"the routing trace {path!r} carries no router digest (recorded by an older version), "
                             "so it cannot be checked against this model: record it again (expertflow trace)")
        if digest is not None and recorded != digest:
            raise ValueError(f"the routing trace {path!r} was recorded on a model with router digest {recorded[:16]}... "
                             f"(fingerprint {trace.fingerprint[:16]}...), but the compiled model's routers have "
                             f"digest {digest[:16]}...: record a trace of this model")
        if digest is None:
            log.warning("expertflow: the compiled model's routers are not known, so the routing trace %r is only "
                        "checked against its MoE layers", path)
        return OraclePredictor(trace)
    raise ValueError(f"make_predictor: no predictor for predictor={config.predictor!r}")

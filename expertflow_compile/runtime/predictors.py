"""Compatibility path: the predictors live in :mod:`expertflow_compile.runtime.prediction`."""

from .prediction import (  # noqa: F401
    LAYER_SHIFT,
    LookaheadPredictor,
    ModelView,
    OraclePredictor,
    PathPredictor,
    Ranked,
    make_predictor,
    path_features,
    prediction_metrics,
    ranked_votes,
    train_path_predictor,
    view_router_digest,
)
from .prediction.path import _embeddings  # noqa: F401

__all__ = ["PathPredictor", "OraclePredictor", "LookaheadPredictor", "make_predictor", "train_path_predictor",
           "path_features", "prediction_metrics", "ranked_votes", "view_router_digest", "ModelView", "Ranked",
           "LAYER_SHIFT"]

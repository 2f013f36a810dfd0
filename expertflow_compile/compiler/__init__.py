"""The compile-time wing: the ``expertflow`` Dynamo backend (``backend.py``), the custom ops the
rewritten graphs call (``ops.py``), the traceable forms of HF's loop-style experts
(``traceable.py``), the eager fallback past Dynamo's recompile limit (``fallback.py``) and the
FX passes (``passes/``). It imports the runtime, never the other way round."""

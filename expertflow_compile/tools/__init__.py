"""Offline tools built on the library: ``bench`` (timed generate runs), ``simulate`` (projected
speed on a named device and link), ``replay`` (a recorded routing trace through the cache), ``evaluate``
(prediction quality and cache replay on a held-out trace: ``expertflow eval``),
``schedule`` and ``regroup`` (token scheduling across a batch). The library never imports them."""

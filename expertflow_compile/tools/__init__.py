"""Offline tools built on the library: ``bench`` (timed generate runs), ``simulate`` (projected
speed on a named device and link), ``replay`` (a recorded routing trace through the cache),
``schedule`` and ``regroup`` (token scheduling across a batch). The library never imports them."""

"""Cluster simulation (torch-free): real cluster policies in simulated time.

* ``cluster.py``: :func:`simulate`, its execution semantics and records
  (:class:`SimRequest`, :class:`RequestRecord`, :class:`SimResult`);
* ``events.py``: the discrete-event loop; ``state.py``: its mutable request
  and batch state (both private);
* ``metrics.py``: LoongServe's normalised latencies, SLOs and goodput.
"""

from __future__ import annotations

from vllm_esp.sim.cluster import RequestRecord, SimRequest, SimResult, simulate

__all__ = ["RequestRecord", "SimRequest", "SimResult", "simulate"]

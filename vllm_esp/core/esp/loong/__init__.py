"""LoongServe's four-step scheduler as a ``ClusterPolicy`` (torch-free).

* ``dispatch.py``: step 1, which waiting requests join this iteration;
* ``allocation.py``: step 2, elastic instance allocation (consolidation,
  setting decode batches aside);
* ``batching.py``: step 3, the batching-and-DoP dynamic program
  (``plan_prefill_batches``);
* ``scaling.py``: step 4, the elastic scaling plan (scale-down by proactive
  migration, multi-master scale-up);
* ``policy.py``: the four steps as one ``ClusterPolicy``;
* ``elastic.py``: that policy behind the engine's ``ElasticPolicy`` interface.
"""

"""Host-memory KV swap for preemption (scheduler ``mlfq-swap``).

* ``host_pool``     torch-free bookkeeping: host slots, per-request copy
                    states, the step's copy plan (scheduler side)
* ``swap_connector`` the vLLM KV connector (both roles)
* ``copy_engine``   the worker's copies (the only torch code here)
"""

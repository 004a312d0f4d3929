"""The decision core: what runs, where, and what it costs, on plain numbers.

Torch-, numpy- and vLLM-free, so the vLLM scheduler, the simulator and the
tests run the same code. ``settings.py`` (the :class:`Settings` base and
``SettingsError``), ``costmodel.py`` (``StepCostModel``), ``choices.py``
(the ``--scheduler`` names) and one package per capability: ``mlfq/``
(ranking policies, admission planner), ``swap/`` (host-slot book) and
``esp/`` (step plan, placement, library plans).

May import: the standard library and other ``vllm_esp.core`` modules only
(``esp`` may use ``mlfq`` and ``swap``, ``mlfq`` may use ``swap``, never the
reverse). Enforced by the import-linter contracts in ``pyproject.toml``.
"""

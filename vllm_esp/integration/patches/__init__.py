"""Runtime forms of the patches in ``patches/``: each module here changes
one vLLM internal that no plugin hook reaches, is installed by
:func:`vllm_esp.register` (so a user's vLLM install is never edited), and
is tested against the matching ``.patch`` file, which is the same change
written for upstream."""

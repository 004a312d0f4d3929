"""Command-line surface: the ``--scheduler`` flag and the ``vllm-esp`` script."""

"""Elastic sequence parallelism (ESP) core: LoongServe-style ring prefill, multi-master decode and the attention math they share."""

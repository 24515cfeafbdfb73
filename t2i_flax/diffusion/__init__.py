"""Inference: pure-function schedulers (schedulers.py) and the one-program text-to-image sampler (sample.py)."""

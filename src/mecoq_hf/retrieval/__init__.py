"""Codes out: scoring kernels and deterministic ranking (`scoring`), metrics and evaluation (`evaluation`),
shallow baselines (`baselines`) and the searchable code index (`index`)."""

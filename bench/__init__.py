"""Benchmarks: engine vs transformers, kernels, fabric, the HTTP load generator, and
the cluster simulator. Each script prints ratios against a baseline or a ceiling
measured in the same run and writes JSON under ``bench/results/``."""

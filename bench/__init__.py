"""Benchmarks for pygpo's ops against what users would otherwise run (see DESIGN.md, Benchmarks).

``python -m bench.logprobs`` runs the fused linear -> log-probs comparison and writes JSON and a PNG
under ``bench/results/``; ``python -m pytest tests/bench -q`` runs the pytest-benchmark entries;
``bench/gpu_check.sh DIR`` runs the GPU checks on a GPU machine (``--cpu`` for a small CPU rehearsal).
"""

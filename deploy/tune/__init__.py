"""Latency-tuned placement: which quantized layers run float on a target runtime, decided by
timing engines on that runtime rather than by rules alone.

Owns: regions of a QDQ graph and the float variant of a set of them (regions.py), the search
that times candidate placements against each other (search.py), and the timing cache that makes
a repeated search free and deterministic (cache.py). Imports deploy.common, deploy.rules,
deploy.export, deploy.lint and deploy.engines, never deploy.app.
"""

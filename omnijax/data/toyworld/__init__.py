"""The toy world: small synthetic scenes seen, described, questioned and spoken in every task.

Deterministic from a seed and small enough that a tiny model learns it on a CPU in minutes, so
the whole any-to-any stack can be trained and evaluated end to end without external data.
"""

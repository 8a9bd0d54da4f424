"""Pruning methods (registered under the ``prune`` step kind)."""

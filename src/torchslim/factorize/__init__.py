"""Low-rank factorization methods (registered under the ``factorize`` step kind)."""

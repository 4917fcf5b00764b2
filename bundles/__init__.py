"""Bundles: a model repository as one reproducible, verifiable, versioned artifact."""

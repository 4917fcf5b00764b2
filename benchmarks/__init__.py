"""Load tests for Tiffin, reported beside the in-process limit of the same model.

Run from the repository root: `python -m benchmarks run --models mlp,cnn`. See
`../shared/BENCHMARKS.md` for the method; `python -m benchmarks --help` for the verbs.
"""

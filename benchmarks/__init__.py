"""Benchmarks: scripts that import polyteacher like any user, print tables and write JSON to
benchmarks/results/. Run them from the repository root as modules: `python -m benchmarks.NAME --help`.
The product never imports or reads anything here."""

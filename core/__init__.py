"""The foundation every stage builds on; it imports no stage (checked by the import-linter contract
in pyproject.toml): configs and presets, file safety, model directories, the distributed engine,
checkpoints and exact resume, metrics, the one training-loop skeleton (loop.py), tables and the
CLI registry. See docs/internals.md, "Layout and layers"."""

"""The MASSIVE task contract: format.py (text-to-text format, parse_target), loader.py (files,
tarball, hub; validation), scoring.py (the official-equivalent scorer, shared ids, bootstrap)."""

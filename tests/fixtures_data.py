"""Data fixtures shared by tests: small tokenizers and packed data built from the data root."""

"""Model fixtures shared by tests: tiny randomly initialised teacher and student directories."""

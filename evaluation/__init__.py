"""polyteacher: evaluation stage."""

"""polyteacher: distill stage."""

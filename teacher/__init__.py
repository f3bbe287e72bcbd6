"""polyteacher: teacher stage."""

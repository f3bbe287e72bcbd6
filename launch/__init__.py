"""polyteacher: launch stage."""

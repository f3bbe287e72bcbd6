"""polyteacher: student stage."""

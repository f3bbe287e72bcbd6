"""polyteacher: data_prep stage."""

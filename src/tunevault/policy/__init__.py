"""What to do on a miss: the mode, the on-miss policy and the seal."""

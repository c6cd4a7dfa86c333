"""RPAL: the first design the testbed verifies."""

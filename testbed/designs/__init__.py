"""Design-specific parts of the testbed (checks, scenarios, models) behind small interfaces."""

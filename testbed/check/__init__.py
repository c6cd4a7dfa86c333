"""Check stage: RPAL invariants as pure functions from snapshots and workload output to findings."""

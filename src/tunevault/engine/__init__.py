"""Tuning: prune -> benchmark -> select, in process or in a disposable worker."""

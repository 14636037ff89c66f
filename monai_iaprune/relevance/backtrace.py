"""Placeholder module: the method registers itself here once implemented."""

"""Curia Node pipelines: series preparation, Curia inference, heads, reports, dispatch."""

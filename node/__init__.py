"""Curia Node: receiving, cataloguing, routing and administration."""

__version__ = "0.1.0"

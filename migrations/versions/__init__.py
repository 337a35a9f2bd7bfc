"""Alembic revisions of the catalogue schema, shipped as package data."""

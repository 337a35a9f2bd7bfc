"""The catalogue's Alembic migrations, shipped as package data so an installed node can upgrade."""

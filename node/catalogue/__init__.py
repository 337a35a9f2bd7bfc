"""The catalogue: what the node holds and what it did with it (SQLAlchemy 2)."""

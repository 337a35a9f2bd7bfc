"""The SR templates shipped with the node: the default ``templates_dir``, found as package data."""

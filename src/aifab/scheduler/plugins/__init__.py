"""Plugins: ordering keys and node scorers, each registered under a name."""

"""The Ray backend: runs aifab's placements on an existing Ray cluster (``pip install 'ray[default]'``)."""

from aifab.backends.ray.backend import RayBackend

__all__ = ["RayBackend"]

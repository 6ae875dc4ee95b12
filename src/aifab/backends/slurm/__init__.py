"""The Slurm backend: each task is one batch job on the node aifab chose (Slurm 22.05+)."""

from aifab.backends.slurm.backend import SlurmBackend

__all__ = ["SlurmBackend"]

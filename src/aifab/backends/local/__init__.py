"""The local backend: runs tasks as supervised processes on this machine."""

from aifab.backends.local.executor import LocalBackend, task_env
from aifab.backends.local.inventory import detect_inventory

__all__ = ["LocalBackend", "detect_inventory", "task_env"]

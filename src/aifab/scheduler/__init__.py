"""aifab.scheduler: a pure, deterministic, KAI/Volcano-style gang scheduler.

``run_cycle(snapshot, config)`` builds a :class:`~aifab.scheduler.session.Session` from the
snapshot, computes hierarchical fair shares (``fairshare``), runs the actions named in
``config.actions`` (registry ``ACTIONS``) and explains every workload that still waits:

- allocate: queues furthest below their fair share first; gangs all-or-nothing; fair share
  first, then idle capacity is lent (borrowing); limits and "non-preemptible only within
  deserved" always hold; ``backfill=False`` makes a blocked head block its line.
- consolidate: move cheap-to-move preemptible workloads off a node so a fragmented gang fits.
- reclaim: a queue below its fair share evicts borrowed work of queues above theirs, never
  taking one below its fair share; jobs inside the queue's unused deserved quota go first, and
  for a multi-GPU one reclaim may also move cheap workloads to assemble a free node.
  Idle GPUs are split into fair shares in whole GPUs by default (``fair_share_quantum``).
- preempt: higher priority evicts lower priority in the same queue.

Decisions of one cycle are applied together, evictions first: a gang bound after eviction uses
the room its victims free. Plugins (queue/job/victim orders, node scorers) are named in the
config and looked up in the registries below; a bad name is a ValidationError, a workload that
cannot run never raises (it gets a PendingReason).

A caller that runs cycle after cycle (the simulator) may pass a :class:`CycleMemo` it keeps:
the cycle then updates what it derived from the previous snapshot instead of deriving it again
(``memo``, ``pending``); the decisions are the same either way. A caller that knows what changed
since its previous snapshot says so in ``ClusterSnapshot.changes``, and the memo's work follows
the changes instead of the length of the workload list.
"""

from aifab.scheduler.actions import ACTIONS
from aifab.scheduler.config import Fairness, SchedulerConfig
from aifab.scheduler.cycle import run_cycle
from aifab.scheduler.fairshare import compute_fair_shares
from aifab.scheduler.memo import CycleMemo
from aifab.scheduler.plugins.nodescore import OURS as NODE_SCORERS
from aifab.scheduler.plugins.nodescore import resolve_scorer
from aifab.scheduler.plugins.orders import JOB_ORDERS, QUEUE_ORDERS, VICTIM_ORDERS

__all__ = [
    "ACTIONS",
    "JOB_ORDERS",
    "NODE_SCORERS",
    "QUEUE_ORDERS",
    "VICTIM_ORDERS",
    "CycleMemo",
    "Fairness",
    "SchedulerConfig",
    "compute_fair_shares",
    "resolve_scorer",
    "run_cycle",
]

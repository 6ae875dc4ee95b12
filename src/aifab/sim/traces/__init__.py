"""Trace loaders. Named traces resolve to files under ``data/`` (see :func:`aifab.sim.traces.registry`)."""

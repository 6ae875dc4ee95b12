"""A tiny checkpointing job for the preemption tests: counts steps, saves after each one,
resumes from the last saved step, and on SIGTERM saves and exits at once."""

from __future__ import annotations

import json
import os
import sys
import time

from aifab import runtime


def main() -> int:
    total, pause = int(sys.argv[1]), float(sys.argv[2])
    runtime.install()
    state = runtime.checkpoint_dir() / "state.json"
    step = json.loads(state.read_text())["step"] if state.exists() else 0
    print(f"attempt {runtime.attempt()} starts at step {step}", flush=True)
    if step:
        print(f"resumed from step {step}", flush=True)
    while step < total:
        if runtime.preempted():
            print(f"preempted at step {step}; saved", flush=True)
            return 0
        time.sleep(pause)
        step += 1
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, state)
        runtime.checkpoint_saved(step)
    print(f"done {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

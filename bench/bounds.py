"""Every attack of the hardening work through the real server process, each against its target.

    python bench/bounds.py [--only jobs,decode,disk,threads]     (`make soak` runs it; DETECT_MODEL and
                                                                   TESTDATA_DIR as for the tests)

The scenarios live beside it, one file each, and run on their own too:
- bench/bounds_decode.py  decode_scenario():  8 concurrent ~49 MP bombs and one 24 MP PNG; peak RSS.
- bench/bounds_disk.py    disk_scenario():    buffered bodies, tricklers, lingering close, the disk floor, SIGTERM.
- bench/bounds_threads.py threads_scenario(): dripping URLs and 200 detect clients with /health probed.
- bench/bounds_jobs.py    jobs_scenario():    40 jobs of 1,000 blocked 2 KB URLs; RSS and log volume.

Each prints markdown rows `| target | measured | ok/FAIL |`. It reports; it asserts nothing (the exit
status is 1 when a row is FAIL).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SCENARIOS = {
    "decode": ("bounds_decode", "decode_scenario"),
    "disk": ("bounds_disk", "disk_scenario"),
    "threads": ("bounds_threads", "threads_scenario"),
    "jobs": ("bounds_jobs", "jobs_scenario"),
}


def passed(result) -> bool:
    """A scenario returns True/False, or its rows as (target, measured, ok or None for skipped)."""
    if isinstance(result, bool):
        return result
    if isinstance(result, list):
        return all((r[2] if isinstance(r, tuple) else r) is not False for r in result)
    return bool(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"scenarios to run (default all: {','.join(SCENARIOS)})")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    ok = True
    for name in names:
        module, function = SCENARIOS[name]
        print(f"\n### {name} ({module}.py)\n", flush=True)
        started = time.monotonic()
        result = getattr(importlib.import_module(module), function)()
        ok = passed(result) and ok
        print(f"\n{name}: {time.monotonic() - started:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

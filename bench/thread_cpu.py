"""CPU share of each thread of a running process (Linux /proc), over a few seconds.

    .venv/bin/python bench/thread_cpu.py PID [--seconds 5]

E.g. a worker under bench/stream_throughput.py's backlog: how much of a core its event loop
thread and its model thread each get. Python does not name OS threads (they all read
"python"): `py-spy dump --pid PID` tells which thread id is MainThread and which model_0.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def thread_ticks(pid: int) -> dict[str, tuple[str, int]]:
    """thread id -> (name, user + system clock ticks so far)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[task.name] = ((task / "comm").read_text().strip(),
                              int(fields[11]) + int(fields[12]))
        except (FileNotFoundError, ProcessLookupError):
            pass                                   # the thread ended meanwhile
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pid", type=int)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    hz = os.sysconf("SC_CLK_TCK")
    before = thread_ticks(args.pid)
    time.sleep(args.seconds)
    after = thread_ticks(args.pid)
    rows = [(tid, name, 100 * (ticks - before.get(tid, (name, 0))[1]) / hz / args.seconds)
            for tid, (name, ticks) in after.items()]
    for tid, name, share in sorted(rows, key=lambda r: -r[2]):
        if share > 0:
            print(f"thread {tid:>8s} {name:16s} {share:5.1f}% of a core")


if __name__ == "__main__":
    main()

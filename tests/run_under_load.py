"""The end-to-end tests on a busy machine: `make test-under-load`.

Starts `--busy` processes that each keep a core busy and one that holds `--memory-gb` of
touched memory, runs the broker-backed tests beside them with the workers logging at info
level (their logs are in each test's tmp folder), `--repeat` times, and stops the load. The
tests wait for readiness, never for fixed times, so they must pass like this; a run that
fails points at a product stall, not at a slow machine (docs/RELIABILITY.md).

    .venv/bin/python tests/run_under_load.py [--busy 2] [--memory-gb 2] [--repeat 1] [PYTEST ARGS]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
E2E = ["tests/test_stream_e2e.py", "tests/test_scale_out.py", "tests/test_faults.py",
       "tests/test_model_updates_e2e.py", "tests/test_recommendations_endpoint.py"]
HOLD = ("import sys, time\n"
        "block = bytearray(int(float(sys.argv[1]) * 2**30))\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "print('held', flush=True)\n"
        "time.sleep(10**6)\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=2, help="busy processes (default 2)")
    parser.add_argument("--memory-gb", type=float, default=2.0,
                        help="memory held while the tests run (default 2)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the tests (default 1)")
    args, pytest_args = parser.parse_known_args()
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(args.memory_gb)],
                              stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()                # the memory is touched: the load is on
        env = dict(os.environ, TEST_WORKER_LOG_LEVEL="info")
        code = 0
        for run in range(1, args.repeat + 1):
            started = time.monotonic()
            code = subprocess.call([sys.executable, "-m", "pytest", "-q", "--durations=5",
                                    *(pytest_args or E2E)], cwd=REPO, env=env)
            print(f"under load ({args.busy} busy, {args.memory_gb:g} GB held), run {run} of "
                  f"{args.repeat}: exit {code} in {time.monotonic() - started:.0f} s",
                  flush=True)
            if code:
                break
        return code
    finally:
        for process in load + [holder]:
            process.kill()
            process.wait()


if __name__ == "__main__":
    sys.exit(main())

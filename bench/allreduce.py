"""Allreduce: raw mpi4py, nanodist's MPI and TCP backends, and torch gloo, in one run.

Prints time and algorithm bandwidth (bytes / time) per size and rank count,
and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import free_port, table  # noqa: E402

RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allreduce_ranks.py")


def run_group(commands: list[list[str]], timeout: float = 600) -> dict[int, float] | str:
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    if any(p.returncode for p in procs):
        return "failed: " + " | ".join(err.strip()[-200:] for _, err in outputs if err.strip())
    return {int(k): v for k, v in json.loads(outputs[0][0].strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or "mpiexec"
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False

    rows = []
    for n in args.ranks:
        results: dict[str, dict[int, float] | str] = {
            "mpi4py raw": run_group([[mpiexec, "-n", str(n), sys.executable, RANKS, "mpi-raw"]]),
            "nanodist mpi": run_group([[mpiexec, "-n", str(n), sys.executable, RANKS, "mpi-nanodist"]]),
        }
        peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(n))
        results["nanodist tcp"] = run_group([[sys.executable, RANKS, "tcp", str(r), peers] for r in range(n)])
        if have_torch:
            port = str(free_port())
            results["torch gloo"] = run_group([[sys.executable, RANKS, "gloo", str(r), str(n), port] for r in range(n)])
        else:
            results["torch gloo"] = "skipped: torch not installed (make bench-setup)"
        print(f"  {n} ranks done", file=sys.stderr)
        for name, result in results.items():
            if isinstance(result, str):
                rows.append([n, name, result, "", "", ""])
                continue
            for mib, seconds in sorted(result.items()):
                gbs = (mib << 20) / seconds / 1e9
                rows.append([n, name, mib, seconds * 1e3, gbs, _ratio(results, name, mib, seconds)])
    print("allreduce of float32 (medians): ms, algorithm bandwidth GB/s, and the ratio to the anchor")
    print("(nanodist mpi vs mpi4py raw; nanodist tcp vs torch gloo)")
    print(table(["ranks", "implementation", "MiB", "ms", "GB/s", "× anchor"], rows))


def _ratio(results: dict[str, dict[int, float] | str], name: str, mib: int, seconds: float) -> str:
    anchor = {"nanodist mpi": "mpi4py raw", "nanodist tcp": "torch gloo"}.get(name)
    reference = results.get(anchor) if anchor else None
    if not isinstance(reference, dict) or mib not in reference:
        return ""
    return f"{reference[mib] / seconds:.2f}"


if __name__ == "__main__":
    main()

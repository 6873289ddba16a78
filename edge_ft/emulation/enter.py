"""Confine this process, then become the job: `python -I -S enter.py SPEC_JSON -- ARGV...`.

Run by emulate.run_confined as the child's first program, so limits are in place before the job's first
instruction (a job that joined its cgroup later could already have loaded numpy and touched memory outside it).
The pid stays the same across exec, so the parent's pid is the job's. Standard library only, no site-packages.
SPEC keys: procs (cgroup.procs files to write our pid to), rlimit_data (bytes), cpus (CPU ids for affinity),
parent (the pid that started us: we die with it, PR_SET_PDEATHSIG; see edge_ft.emulation.lifetime).
Exit 125: confinement failed or the parent was already gone; 127: the job's program was not found.
"""

import json
import os
import resource
import sys


def die_with_parent(parent: int) -> None:
    """SIGKILL when the parent (the thread that started us) exits; it survives exec. Exit if it already did."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):  # not Linux: the parent's guardian and the next sweep remain
        pass
    if os.getppid() != parent:  # it died before prctl took effect: we were reparented
        os._exit(125)


def main() -> None:
    spec, argv = json.loads(sys.argv[1]), sys.argv[3:]
    if spec.get("parent"):
        die_with_parent(int(spec["parent"]))
    try:
        for path in spec.get("procs", []):
            with open(path, "w") as f:
                f.write(str(os.getpid()))
        if spec.get("rlimit_data"):
            limit = int(spec["rlimit_data"])
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        if spec.get("cpus"):
            os.sched_setaffinity(0, spec["cpus"])
    except OSError as e:
        sys.stderr.write(f"edge-ft: cannot confine the job ({e})\n")
        os._exit(125)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        sys.stderr.write(f"edge-ft: cannot run {argv[0]!r} ({e.strerror or e})\n")
        os._exit(127)


if __name__ == "__main__":
    main()

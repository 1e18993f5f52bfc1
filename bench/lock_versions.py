"""On the GPU machine: which packages of the CUDA image's lock this Python imports at another version.

  PYTHONPATH=/tmp/site python bench/lock_versions.py /tmp/site/LOCK.txt

Prints one JSON line: how many of the lock's packages match, and each that differs or is missing (name, lock,
here). The bundle (bench/gpu_bundle_from_lock.sh) carries most of them; the machine supplies torch, its CUDA stack
and the large compiled libraries."""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata


def main(lock_path: str) -> None:
    wanted = {}
    for line in open(lock_path):
        if match := re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip()):
            wanted[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    differ = []
    for name, version in sorted(wanted.items()):
        try:
            here = metadata.version(name)
        except metadata.PackageNotFoundError:
            here = None
        if here is None or here.split("+")[0] != version.split("+")[0]:
            differ.append({"name": name, "lock": version, "here": here})
    print(json.dumps({"lock_packages": len(wanted), "same": len(wanted) - len(differ), "differ": differ}))


if __name__ == "__main__":
    main(sys.argv[1])

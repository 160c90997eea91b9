"""What launch/setup.sh needs to know about the torch in a virtual environment, from the standard library only.

    .venv/bin/python launch/torch_pin.py constraint   # torch==2.13.0: a pip constraint that keeps this torch
    .venv/bin/python launch/torch_pin.py describe     # one line: version, CPU or CUDA build, size on disk
    .venv/bin/python launch/torch_pin.py sizes        # JSON {distribution: bytes installed} (experiments.measured)

The constraint pins the installed distribution's own version (its metadata), never `torch.__version__`: the
CUDA wheels on the public index are version 2.13.0 while their `__version__` reads 2.13.0+cu130, and a
constraint on the latter is one pip can never satisfy (ResolutionImpossible on the next install).
"""

from __future__ import annotations

import sys
from importlib import metadata

# Distributions that come with a torch build: the CUDA wheels pull the nvidia-* runtime and triton.
_BUILD_COMPANIONS = ("torch", "triton", "nvidia-", "cuda-")


def constraint() -> str:
    return f"torch=={metadata.version('torch')}"


def _size_bytes(dist: metadata.Distribution) -> int:
    total = 0
    for file in dist.files or []:
        try:
            total += file.locate().stat().st_size
        except OSError:
            pass
    return total


def sizes() -> str:
    """Every installed distribution's size on disk, as JSON."""
    import json

    return json.dumps({(d.metadata["Name"] or "").lower(): _size_bytes(d) for d in metadata.distributions()})


def describe() -> str:
    import torch  # only here: the constraint must not depend on torch importing

    cuda = torch.version.cuda
    build = f"CUDA {cuda} build" if cuda else "CPU build"
    names, size = set(), 0
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name not in names and any(name == p or (p.endswith("-") and name.startswith(p)) for p in _BUILD_COMPANIONS):
            names.add(name)
            size += _size_bytes(dist)
    extra = f" with {len(names) - 1} CUDA runtime packages" if len(names) > 1 else ""
    return f"torch {metadata.version('torch')} ({build}), {size / 1e9:.2f} GB on disk{extra}"


def main(argv: list[str]) -> int:
    commands = {"constraint": constraint, "describe": describe, "sizes": sizes}
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: torch_pin.py {{{','.join(commands)}}}", file=sys.stderr)
        return 2
    print(commands[argv[0]]())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Which code, command, libraries and machine made a result: one record every result JSON carries.

    from skeleton_ds.provenance import provenance
    record = {"provenance": provenance(), ...}

The code version is `git describe --always --dirty` of the checkout the package runs from, or the
installed package's version outside a checkout (a wheel). Nothing here imports the libraries it
reports: versions come from the installed distributions' metadata, so `infer` stays light.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LIBRARIES = ("torch", "transformers", "deepspeed", "peft", "bitsandbytes", "accelerate", "safetensors")
"""Recorded when installed (absent ones are recorded as null, so a reader sees they were looked for)."""

FIELDS = ("code_version", "command", "libraries", "device", "date")
"""The keys every provenance record has (tests check result JSONs for them)."""


def code_version() -> str:
    """`git describe --always --dirty` of the source tree this module was imported from; outside a git
    checkout (an installed wheel), "skeleton-ds <version>"."""
    source = Path(__file__).resolve().parent.parent
    if (source / ".git").exists():
        try:
            done = subprocess.run(["git", "-C", str(source), "describe", "--always", "--dirty"], capture_output=True,
                                  text=True, timeout=10, check=True)
            return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return f"skeleton-ds {version('skeleton-ds')}"
    except PackageNotFoundError:
        return "unknown"


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description() -> dict:
    """The CPU (model, cores, torch threads, load when recorded) and, when torch already sees one, the GPU."""
    described = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "machine": platform.machine(),
                 "python": platform.python_version(),
                 "load_average_1min": round(os.getloadavg()[0], 2)}  # was the machine otherwise idle?
    torch = sys.modules.get("torch")  # never import torch just to describe the machine
    if torch is not None:
        described["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            described["gpu"] = torch.cuda.get_device_name()
            described["gpu_count"] = torch.cuda.device_count()
            described["cuda"] = torch.version.cuda
    return described


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would retype it (the program name without its directory for console scripts)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith("skeleton-ds"):
        argv[0] = "skeleton-ds"
    return shlex.join(argv)


def provenance(command: str | None = None) -> dict:
    """The record: code version, command line, library versions, device and UTC date-time."""
    return {"code_version": code_version(), "command": command if command is not None else command_line(),
            "libraries": library_versions(), "device": device_description(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def missing_fields(record: dict) -> list[str]:
    """Provenance fields a result record lacks (empty when it has them all)."""
    found = record.get("provenance")
    if not isinstance(found, dict):
        return list(FIELDS)
    return [k for k in FIELDS if not found.get(k)]


def source_line(record: dict, json_path: str) -> str:
    """The line under a guide's table that names where its numbers came from: the commit, date, machine
    and command, or, for a record made before provenance was recorded, that it was."""
    found = record.get("provenance")
    if not isinstance(found, dict):
        made = record.get("date") or record.get("environment", {}).get("date")
        when = f" on {str(made)[:10]}" if made else ""
        command = f": `{record['command']}`" if isinstance(record.get("command"), str) else ""
        return (f"Source: `{json_path}`, measured{when} before provenance was recorded (the commit that made it is "
                f"not known){command}.")
    device = found.get("device", {})
    machine = device.get("gpu") or f"{device.get('cpu', 'CPU')}, {device.get('cpu_cores')} cores"
    return (f"Source: `{json_path}`, made by commit `{found['code_version']}` on {found['date'][:10]} ({machine}, "
            f"load {device.get('load_average_1min', '?')}): `{found['command']}`.")

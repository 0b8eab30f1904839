"""Wall time and CPU time of a command and every process it starts, forked grandchildren included.

    python bench/process_cpu.py -- tap demo --no-progress --workdir /tmp/demo-cpu
    python bench/process_cpu.py --json out.json -- tap simulate --no-progress

``/usr/bin/time`` counts only the children a process waited for; the demo's server and agents are
forked by a multiprocessing forkserver (tap_cli/launcher.py), so their CPU never reaches it. This
samples ``/proc`` every ``--every`` seconds and keeps, per process of the command's tree, the last
user + system time it showed (a process's CPU after its last sample is missed: at most one interval).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def _name(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in args if a)
    return f"{comm}: {text[-70:]}"


def measure(command: list[str], every: float) -> dict:
    started = time.perf_counter()
    root = subprocess.Popen(command)
    seen: dict[int, dict] = {}
    while True:
        stats = {pid: _stat(pid) for pid in (int(p) for p in os.listdir("/proc") if p.isdigit())}
        tree = {root.pid}
        grew = True
        while grew:  # the descendants of the command, however deep
            grew = False
            for pid, stat in stats.items():
                if stat and stat[0] in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        for pid in tree:
            stat = stats.get(pid)
            if stat:
                entry = seen.setdefault(pid, {"pid": pid, "name": _name(pid)})
                entry["cpu_s"] = stat[1]
                entry["name"] = _name(pid) if entry["name"] == "?" else entry["name"]
        if root.poll() is not None:
            break
        time.sleep(every)
    wall = time.perf_counter() - started
    processes = sorted(seen.values(), key=lambda e: -e.get("cpu_s", 0.0))
    return {
        "command": command,
        "exit_code": root.returncode,
        "wall_s": wall,
        "cpu_s": sum(e.get("cpu_s", 0.0) for e in processes),
        "processes": processes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    result = measure(command, args.every)
    print(f"\n{'CPU s':>8}  process")
    for entry in result["processes"]:
        if entry.get("cpu_s", 0.0) >= 0.05:
            print(f"{entry['cpu_s']:8.1f}  {entry['name']}")
    print(
        f"\nwall {result['wall_s']:.1f} s, CPU {result['cpu_s']:.1f} s over {len(result['processes'])} processes "
        f"({result['cpu_s'] / result['wall_s']:.2f} cores busy on average of {os.cpu_count()}); exit {result['exit_code']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    sys.exit(result["exit_code"])


if __name__ == "__main__":
    main()

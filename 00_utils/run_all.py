"""Run every topic's demo and print a summary table: the main job of LLM Lab.

    python 00_utils/run_all.py --quick      # every demo in quick mode (minutes on 2 CPU cores)
    python 00_utils/run_all.py              # full mode: refreshes each topic's figures/ and results.json
    python 00_utils/run_all.py --topics 01 04 --device cuda --timeout 600

A failing topic does not stop the others; the exit status is non-zero when any topic failed. Each
demo is killed after --timeout seconds (default 300 quick, 1800 full). The summary ends with the
total time. A failed topic's previous results.json is renamed results.previous.json, never left as current.
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab_paths import TOPIC_DIRS
from runtime import DEVICE_CHOICES


def demo_scripts(selected: list[str] | None = None) -> list[Path]:
    """The demo.py of every topic folder, in curriculum order, optionally filtered by number or name prefix."""
    scripts = [d / "demo.py" for d in TOPIC_DIRS if (d / "demo.py").is_file()]
    if selected:
        scripts = [s for s in scripts if any(s.parent.name.startswith(prefix) for prefix in selected)]
    return scripts


DEFAULT_TIMEOUT_SECONDS = {"quick": 300, "full": 1800}  # per demo; a quick run should take about 40 s


def run_demo(script: Path, quick: bool, device: str, out_dir: Path | None, timeout: float | None = None) -> dict:
    """Run one demo in a subprocess, killed after `timeout` seconds; returns its row of the summary table.

    A results.json already in the output folder is first renamed results.previous.json (and removed
    once the demo succeeds), so a failed or killed run never leaves the last run's numbers looking current.
    """
    command = [sys.executable, str(script), "--device", device]
    if quick:
        command.append("--quick")
    target = out_dir or script.parent
    if out_dir is not None:
        command += ["--out", str(out_dir)]
    results_path, previous_path = target / "results.json", target / "results.previous.json"
    if results_path.exists():
        os.replace(results_path, previous_path)
    started_wall = time.time()
    start = time.perf_counter()
    # Passive OpenMP waiting: on shared or busy cores, spinning torch threads slowed demos 4-25x.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    try:
        returncode = subprocess.run(command, cwd=script.parent, env=env, timeout=timeout).returncode
        status = "ok" if returncode == 0 else f"FAILED ({returncode})"
    except subprocess.TimeoutExpired:  # subprocess.run has killed the demo
        status = f"TIMEOUT ({timeout:.0f} s)"
    seconds = time.perf_counter() - start
    wrote_results = results_path.is_file() and results_path.stat().st_mtime >= started_wall - 1
    if status == "ok" and wrote_results:
        previous_path.unlink(missing_ok=True)
    elif status == "ok":
        status = "FAILED (no results.json)"
    if status != "ok" and previous_path.exists():
        print(f"[run_all] {script.parent.name}: {status}; the last run's numbers are kept as {previous_path} "
              f"and no results.json is current", file=sys.stderr)
    figure_dir = target / "figures"
    written = [p for p in figure_dir.glob("*.png") if p.stat().st_mtime >= started_wall - 1] if figure_dir.is_dir() else []
    return {"topic": script.parent.name, "status": status, "seconds": seconds, "figures": len(written)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="run each demo with --quick")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    parser.add_argument("--topics", nargs="*", help="topic numbers or folder-name prefixes to run (default: all)")
    parser.add_argument("--timeout", type=float, default=None,
                        help=f"seconds before a demo is killed and marked TIMEOUT (default: "
                             f"{DEFAULT_TIMEOUT_SECONDS['quick']} with --quick, {DEFAULT_TIMEOUT_SECONDS['full']} full)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write each topic's output under OUT/NN_topic (default: quick runs go to a temp "
                             "folder, full runs refresh each topic folder)")
    args = parser.parse_args(argv)

    timeout = DEFAULT_TIMEOUT_SECONDS["quick" if args.quick else "full"] if args.timeout is None else args.timeout
    if not math.isfinite(timeout) or timeout <= 0:
        parser.error(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    scripts = demo_scripts(args.topics)
    if not scripts:
        print("no demo.py found for the selected topics", file=sys.stderr)
        return 1
    out_root = args.out
    if out_root is None and args.quick:
        out_root = Path(tempfile.gettempdir()) / "llm_lab_quick"
    rows = []
    for script in scripts:
        print(f"\n=== {script.parent.name} ===", flush=True)
        out_dir = out_root / script.parent.name if out_root is not None else None
        rows.append(run_demo(script, args.quick, args.device, out_dir, timeout))

    print(f"\n{'topic':<28} {'status':<24} {'seconds':>8} {'figures':>8}")
    for row in rows:
        print(f"{row['topic']:<28} {row['status']:<24} {row['seconds']:>8.1f} {row['figures']:>8}")
    failed = [row["topic"] for row in rows if row["status"] != "ok"]
    total = sum(row["seconds"] for row in rows)
    print(f"\n{len(rows) - len(failed)} of {len(rows)} topics ok in {total:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if out_root is not None:
        print(f"outputs under {out_root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

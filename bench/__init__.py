"""``make bench`` (``python -m bench``): measure a local 3-node mesh with remote handlers side
by side with APScheduler 4 alone (MemoryDataStore, and SQLAlchemyDataStore on aiosqlite) and,
in fires and lateness, 3 APScheduler processes sharing a PostgreSQL cluster the benchmark starts
(skipped, with the reason, without PostgreSQL).

Figures (see docs/performance.md): sustained fires/s, follower write latency, failover,
steady (leader changes, fires/s, lateness and leader CPU over 10 minutes at 1,000 fires/s
offered), lateness at 1,000 schedules, scale (100,000 schedules: RSS, restart, CPU per tick;
full runs then 1,000,000 created in bulk), idle CPU,
timing (token-bucket rate, sends to an unreachable peer, toxiproxy toxics, the no-handler
wait: bounds that unit tests used to assert), curve (write latency and fires/s with CURVE
keys against the same without, in one run), replica (a read-only replica's lag at 250 to
1,000 changes/s, and its reads against a follower voter's with the voters' request counts),
and dashboard (the dashboard's reads with 10,000 schedules against fetching every schedule,
and its pages' load times in headless Chromium).
The meshes run with CURVE keys unless --no-keys.
Results go to ``bench-results/bench-<timestamp>.json`` with PNG plots beside it, and a table is
printed. Every process started is stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]

ORDER = (
    "idle",
    "write",
    "fires",
    "lateness",
    "failover",
    "steady",
    "scale",
    "timing",
    "curve",
    "replica",
    "dashboard",
)
# Steps of a phase that --only can also name alone; a default run reaches them through their
# phase (the scale phase ends with the million step in full runs), so they are not in ORDER.
STEPS = ("million",)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"python -m bench: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m bench",
        description="Benchmark a local 3-node mesh with 2 handler processes against "
        "APScheduler 4 alone. Writes bench-results/bench-<timestamp>.json and PNG plots.",
        allow_abbrev=False,
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes, shorter windows (~5 min)")
    p.add_argument(
        "--only",
        metavar="LIST",
        help=f"comma-separated subset of: {','.join(ORDER)}; or a step alone: "
        f"{','.join(STEPS)} (the scale phase's 1,000,000-schedule step, --scale scales it)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply counts (and shorten windows) by F, e.g. 0.05 for a smoke run",
    )
    p.add_argument("--out", default="bench-results", metavar="DIR", help="output directory")
    p.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the APScheduler-alone baselines",
    )
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    p.add_argument(
        "--profile",
        action="store_true",
        help="sample the leader with py-spy during the 2,000 fires/s step",
    )
    p.add_argument("--keep", action="store_true", help="keep the nodes' data and logs")
    p.add_argument(
        "--no-keys",
        dest="secure",
        action="store_false",
        help="run the meshes without CURVE keys (default: with keys; the curve phase runs both)",
    )
    p.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default=None,
        help="the nodes' and handlers' event loop (default: uvloop when installed, see "
        "mesh/eventloop.py): for an A/B measurement",
    )
    return p


def _source_info(root: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(root)}
    try:
        info["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        info["modified_files"] = [line[3:] for line in status.splitlines()]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench``; returns the exit code."""
    try:
        ns = _parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    only = ORDER
    if ns.only:
        only = tuple(x.strip() for x in ns.only.split(",") if x.strip())
        unknown = [x for x in only if x not in ORDER + STEPS]
        if unknown or not only:
            bad = unknown[0] if unknown else ""
            print(
                f"python -m bench: error: --only: unknown figure {bad!r} "
                f"(choose from {','.join(ORDER + STEPS)})",
                file=sys.stderr,
            )
            return 2
    if not 0 < ns.scale <= 10:
        print("python -m bench: error: --scale must be in (0, 10]", file=sys.stderr)
        return 2

    from bench import phases, report
    from bench.common import Progress, Run
    from bench.harness import SOURCE_ROOT, BenchError, stop_everything
    from bench.stats import machine_info

    out_dir = Path(ns.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(tempfile.mkdtemp(prefix="schedulezero-bench-"))
    progress = Progress()
    run = Run(
        root=root,
        out_dir=out_dir,
        quick=ns.quick,
        scale=ns.scale,
        baseline=ns.baseline,
        profile=ns.profile,
        secure=ns.secure,
        event_loop=ns.event_loop,
        progress=progress,
        stem=f"bench-{stamp}",
    )
    results: dict[str, Any] = {
        "version": 1,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {
            "quick": ns.quick,
            "only": list(only),
            "scale": ns.scale,
            "baseline": ns.baseline,
            "profile": ns.profile,
            "secure": ns.secure,
            "event_loop": ns.event_loop,
        },
        "machine": machine_info(),
        "source": _source_info(SOURCE_ROOT),
        "figures": {},
        "errors": {},
    }

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    t_start = time.monotonic()
    try:
        progress("bench", f"figures {','.join(only)}; working directory {root}")
        for name in ORDER + STEPS:
            if name not in only:
                continue
            t = time.monotonic()
            try:
                figure = results["figures"][name] = phases.PHASES[name](run)
                # A phase of independent parts (timing) reports the parts it could not measure.
                for part, err in figure.pop("failed", {}).items():
                    results["errors"][f"{name}.{part}"] = err
                progress(name, f"done in {time.monotonic() - t:.1f}s")
            except (BenchError, OSError, ValueError, KeyError) as e:
                results["errors"][name] = f"{type(e).__name__}: {e}"
                mesh = run.current_mesh
                if mesh is not None and getattr(mesh, "exited_before_stop", None):
                    results["errors"][name] += (
                        f" (processes that had exited on their own, with exit codes: "
                        f"{mesh.exited_before_stop}; logs in {mesh.root})"
                    )
                progress(name, f"FAILED: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            finally:
                stop_everything()
    except KeyboardInterrupt:
        interrupted = True
        progress("bench", "interrupted: stopping every process")
    finally:
        stop_everything()
        signal.signal(signal.SIGTERM, previous)
        if ns.keep or results["errors"]:
            progress("bench", f"nodes' data and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    results["elapsed_s"] = time.monotonic() - t_start
    results["interrupted"] = interrupted
    results["table"] = report.rows(results["figures"])
    results["notes"] = report.notes(results["figures"])
    json_path = out_dir / f"bench-{stamp}.json"
    if ns.plots:
        plots = report.plots(results["figures"], out_dir, f"bench-{stamp}")
        if plots is None and results["figures"]:
            progress("bench", "no plots: matplotlib is missing (pip install '.[bench]')")
        results["plots"] = plots or []
    json_path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print()
    print(report.table(results["table"], results["errors"], results["notes"]))
    prof = results["figures"].get("fires", {}).get("profile")
    if isinstance(prof, dict) and prof.get("self"):
        print(
            f"\nleader profile at {prof.get('step_offered', 0):.0f} fires/s offered: busy "
            f"{prof.get('busy_percent')}% of {prof['samples']} samples; top self time (% of busy):"
        )
        for item in prof["self"][:10]:
            print(f"  {item['percent']:5.1f}%  {item['function']}")
    print(f"\nresults: {json_path}")
    for p in results.get("plots", []):
        print(f"plot:    {p}")
    if interrupted:
        return 130
    return 1 if results["errors"] else 0

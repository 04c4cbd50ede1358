"""``python -m chaos`` (``make chaos``): the randomized chaos suite.

    python -m chaos                       # 100 runs, random scenarios, seed from the clock
    python -m chaos --runs 20 --seed 7    # reproducible: run k uses seed 7+k
    python -m chaos --scenario leader_partition --runs 3
    python -m chaos --lan                 # the network-namespace LAN scenarios (root)
    python -m chaos --no-keys             # without CURVE keys (default: every process has one)

Prints a table per run and a summary; saves JSON and text reports under --out. Exit code 1 if
any run found a violation (failing runs' data directories are kept under --out).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from chaos.runner import connect_toxiproxy, format_table, run_once, save
from chaos.scenarios import SCENARIOS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default=None,
        help="one scenario for every run (default: a seeded random choice per run)",
    )
    p.add_argument(
        "--nodes",
        type=int,
        choices=(3, 5),
        default=None,
        help="default: 3, or 5 for a third of the runs",
    )
    p.add_argument("--duration", type=float, default=4.0, help="seconds of faults per run")
    p.add_argument("--out", type=Path, default=Path("chaos-results"))
    p.add_argument("--lan", action="store_true", help="run the network-namespace LAN scenarios")
    p.add_argument(
        "--no-keys",
        dest="keys",
        action="store_false",
        help="run the nodes and handlers without CURVE keys (default: a key each; on the LAN "
        "they then need --insecure, which is given)",
    )
    p.add_argument(
        "--snapshot-threshold",
        type=int,
        default=None,
        help="raft.snapshot_threshold for the nodes (e.g. 50: snapshots and snapshot "
        "transfers under faults); default: the configuration default",
    )
    args = p.parse_args(argv)
    if args.snapshot_threshold is not None and args.snapshot_threshold < 1:
        p.error("--snapshot-threshold must be at least 1")
    if args.runs < 1:
        p.error("--runs must be at least 1")

    if args.lan:
        from chaos.lan import main as lan_main

        return lan_main(args)

    from chaos.toxiproxy_server import ensure_toxiproxy

    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    keys = "CURVE keys" if args.keys else "no keys"
    print(
        f"chaos: {args.runs} runs, {keys}, base seed {seed} (rerun with --seed {seed})",
        flush=True,
    )
    handle = ensure_toxiproxy("127.0.0.1", 8474)
    reports = []
    try:
        tox = connect_toxiproxy("127.0.0.1", handle.port)
        picker = random.Random(seed)
        names = sorted(SCENARIOS)
        for k in range(args.runs):
            run_seed = seed + k
            scenario = args.scenario or picker.choice(names)
            nodes = args.nodes or (5 if picker.random() < 1 / 3 else 3)
            report = run_once(
                scenario,
                run_seed,
                tox,
                nodes=nodes,
                duration=args.duration,
                keep=args.out,
                snapshot_threshold=args.snapshot_threshold,
                secure=args.keys,
            )
            reports.append(report)
            status = "ok" if not report.get("violations") else "VIOLATION"
            print(
                f"[{k + 1}/{args.runs}] {scenario} seed={run_seed} nodes={nodes} {status} "
                f"({report['seconds']}s) leaders={report.get('leader_changes')} "
                f"fires={report.get('fires_checked')} "
                f"retried={report.get('retry_fires')}/{report.get('retry_tries')} "
                f"overlap_runs={report.get('overlap_runs')} "
                f"acked={report.get('writes_acked')} "
                f"unavail={report.get('unavailability_s')}s snapshots={report.get('snapshots')}",
                flush=True,
            )
            for v in report.get("violations") or []:
                print(f"    ! {v}", flush=True)
    finally:
        handle.stop()
    print(format_table(reports))
    path = save(reports, args.out)
    print(f"report: {path}")
    return 1 if any(r.get("violations") for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())

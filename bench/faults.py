"""``make bench-faults``: the fault suite's faults, longer and on a larger fleet.

Each contract gets a stack of its own (durable PostgreSQL with TimescaleDB, Mosquitto, two
ingest workers, one rules worker, ``galvani-fleet``; see ``tests/faults.py``), and the five
faults run in order on it: an ingest worker killed -9, the rules worker killed -9, the broker
killed -9, the broker killed -9 while ingest is stopped and ``--queued`` messages wait in
it, PostgreSQL down for ``--postgres-down`` seconds. After each, the ledger compares
every seq the devices deleted from their outboxes with the database. One line per fault:

    contract=stored fault=broker_kill9 published=… stored=… lost=0 duplicates=0 recovery_s=…

``--contract stored`` is Galvani's: a device deletes a message when ingest's ack says it is
stored. ``--contract puback`` runs the same faults on devices that delete on the broker's
PUBACK (firmware that does not listen on ``ack``), to show what that contract loses.
"""

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.faults import FaultResult, FaultStack

CONTRACTS = ("stored", "puback")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (through ``BENCH_ARGS``)."""
    parser = argparse.ArgumentParser(prog="bench.faults", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=200, help="simulated devices (200)")
    parser.add_argument(
        "--activity", type=float, default=2000.0, help="session-rate multiplier (2000)"
    )
    parser.add_argument(
        "--settle", type=float, default=20.0, help="seconds of normal running around each fault"
    )
    parser.add_argument(
        "--service-down",
        type=float,
        default=5.0,
        help="seconds a killed worker or broker stays down (5)",
    )
    parser.add_argument("--postgres-down", type=float, default=20.0, help="seconds (20)")
    parser.add_argument(
        "--queued",
        type=int,
        default=1000,
        help="messages published while ingest is stopped, before the broker is killed (1000)",
    )
    parser.add_argument(
        "--contract",
        choices=(*CONTRACTS, "both"),
        default="both",
        help="the devices' outbox contract (both: stored, then puback)",
    )
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def run_contract(args: argparse.Namespace, contract: str, root: Path) -> list[FaultResult]:
    """Start a stack whose devices follow ``contract``, run the four faults, stop it."""
    stack = FaultStack(
        root=root / contract,
        devices=args.devices,
        activity=args.activity,
        seed=args.seed,
        delete_on=contract,
    )
    down = args.service_down
    faults: list[tuple[str, Callable[[], None], Callable[[], None] | None]] = [
        ("ingest_kill9", lambda: stack.kill_ingest(down), None),
        ("rules_kill9", lambda: stack.kill_rules(down), None),
        ("broker_kill9", lambda: stack.kill_broker(down), None),
        (
            "broker_kill9_ingest_stopped",
            lambda: stack.kill_broker_then_start_ingest(down),
            lambda: stack.stop_ingest_until_published(args.queued),
        ),
        ("postgres_stop", lambda: stack.stop_postgres(args.postgres_down), None),
    ]
    print(f"contract={contract}: starting {args.devices} devices", flush=True)
    try:
        stack.start()
        for name, inject, prepare in faults:
            stack.run_fault(
                name, inject, args.settle, prepare=prepare, label=f"contract={contract} "
            )
        unapplied = stack.unapplied_safe_pushes()
        print(
            f"contract={contract} safe_pushes={stack.safe_pushes()} "
            f"unapplied_at_end={len(unapplied)}",
            flush=True,
        )
    finally:
        stack.stop()
    return stack.results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the faults for each contract asked; non-zero if the stored contract lost anything."""
    args = parse_args(argv)
    contracts = CONTRACTS if args.contract == "both" else (args.contract,)
    root = Path(tempfile.mkdtemp(prefix="galvani-bench-faults-"))
    root.chmod(0o755)  # the servers run as an unprivileged user
    failed = False
    lines: list[str] = []
    try:
        for contract in contracts:
            results = run_contract(args, contract, root)
            lines += [f"contract={contract} {result.line()}" for result in results]
            if any(r.ledger.dropped for r in results):
                # The ledger cannot tell which seqs an outbox dropped: the run proves nothing.
                print(f"contract={contract}: outboxes dropped messages; run shorter", flush=True)
                failed = True
            if contract == "stored":
                failed |= any(
                    r.ledger.lost or r.ledger.duplicates or r.ledger.miscounted for r in results
                )
        print("\n".join(["", "results:", *lines]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

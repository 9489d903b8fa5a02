"""The ``awt`` command line: ``awt verify`` (and later subcommands)."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _verify(args: argparse.Namespace) -> int:
    from .registry import registry, run_checks
    from .report import format_table, write_report

    reg = registry()
    if args.list:
        for cid, chk in reg.items():
            print(f"{cid:5s} {chk.rigour:9s} {chk.title}")
        return 0
    from .registry import get_check
    try:                      # usage errors only; an exception inside a check is a bug and propagates
        for cid in args.only or []:
            get_check(cid)
    except ValueError as exc:
        print(f"awt verify: {exc}", file=sys.stderr)
        return 2
    done = {}
    if args.resume:
        from .report import read_resumable
        done, why = read_resumable(args.out, scale=args.scale, seed=args.seed)
        print(f"awt verify: {why}", file=sys.stderr)

    def checkpoint(so_far):  # after each check: its figure and an atomic partial report, what --resume reads
        from pathlib import Path

        from .report import _plot
        Path(args.out).mkdir(parents=True, exist_ok=True)
        _plot(so_far[-1], Path(args.out) / f"{so_far[-1].id}.png")
        write_report(so_far, args.out, scale=args.scale, seed=args.seed, complete=False, figures=False)

    results = run_checks(args.only or None, scale=args.scale, seed=args.seed, done=done, on_result=checkpoint,
                         progress=lambda msg: print(f"running {msg} ...", file=sys.stderr, flush=True))
    print(format_table(results))
    paths = write_report(results, args.out, scale=args.scale, seed=args.seed)
    print(f"\nreport: {paths['json']}  ({paths['md']})")
    return 0 if all(r.passed for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="awt", description="Adversarial Winning Tickets: NTK theory, checked numerically.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="run the numerical checks of the theory (THEORY.md §C) and write a report")
    v.add_argument("--list", action="store_true", help="list the registered checks and exit")
    v.add_argument("--only", action="append", metavar="ID", help="run only this check (repeatable), e.g. --only C1")
    v.add_argument("--out", default="awt-report", help="output folder for report.json/report.md/figures (default: %(default)s)")
    v.add_argument("--scale", choices=("quick", "full"), default="quick", help="sweep size (default: %(default)s)")
    v.add_argument("--seed", type=int, default=0, help="base random seed (default: %(default)s)")
    v.add_argument("--resume", action="store_true",
                   help="reuse the results of an interrupted (or earlier) run in --out with the same scale and seed; "
                        "the report is rewritten after every check")
    v.set_defaults(func=_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

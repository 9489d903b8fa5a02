"""The ``awt`` command line: a dispatcher over the subcommands ``verify`` (this package) and
``experiment`` (``empirical.cli``, imported only when asked for).

``awt verify`` exit statuses: 0 every check passed, 1 some check failed, 2 bad arguments (one
line on stderr, before any check runs), 130 interrupted (one line saying how to resume).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) instead of the usage block."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Usage(Exception):
    """A bad argument: printed as one line, exit status 2."""


def _out_problem(out: str) -> str | None:
    """Why ``out`` cannot hold a report (None if it can), without creating anything."""
    p = Path(out)
    if p.exists():
        if not p.is_dir():
            return f"{out} exists and is not a folder"
        if not os.access(p, os.W_OK | os.X_OK):
            return f"folder {out} is not writable"
        return None
    anc = p.absolute().parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        return f"cannot create {out}: {anc} is a file"
    if not os.access(anc, os.W_OK | os.X_OK):
        return f"cannot create {out}: {anc} is not writable"
    return None


def _validate(args: argparse.Namespace, reg) -> list[str]:
    """Check every argument of ``awt verify``; return the chosen ids (registry order, no duplicates)."""
    from ntk_theory._checks import check_device

    from .registry import check_seed, get_check
    try:
        check_seed(args.seed)
    except (TypeError, ValueError) as exc:
        raise _Usage(f"--seed: {str(exc).split(': ', 1)[1]}") from None
    chosen = set()
    for cid in args.only or []:
        try:
            chosen.add(get_check(cid.strip().upper()).id)
        except ValueError as exc:
            raise _Usage(f"--only: {str(exc).split(': ', 1)[1]}") from None
    ids = [c for c in reg if c in chosen]
    if args.list:
        return ids
    try:
        check_device(args.device, "device")
    except (TypeError, ValueError) as exc:
        raise _Usage(f"--device: {str(exc).split(': ', 1)[1]}") from None
    why = _out_problem(args.out)
    if why:
        raise _Usage(f"--out: {why}")
    return ids


def _verify(args: argparse.Namespace) -> int:
    from .registry import registry, run_checks
    from .report import format_table, merge_results, plot_result, read_resumable, write_report

    reg = registry()
    try:
        ids = _validate(args, reg)
        done = {}
        if args.resume and not args.list:
            try:
                done, why = read_resumable(args.out, scale=args.scale, seed=args.seed)
            except ValueError as exc:
                raise _Usage(f"--resume: {str(exc).split(': ', 1)[1]}") from None
            print(f"awt verify: {why}", file=sys.stderr)
    except _Usage as exc:
        print(f"awt verify: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.list:
        for cid in ids or reg:
            chk = reg[cid]
            print(f"{cid:5s} {chk.rigour:9s} {chk.title}")
        return EXIT_OK

    out = Path(args.out)
    order = list(reg)
    finished: list = []

    def on_start(chk):
        print(f"running {chk.id}: {chk.title} ...", file=sys.stderr, flush=True)

    def checkpoint(so_far):  # after each check: its figure and an atomic partial report, what --resume reads
        finished[:] = so_far
        out.mkdir(parents=True, exist_ok=True)
        plot_result(so_far[-1], out / f"{so_far[-1].id}.png")
        write_report(merge_results(done, so_far, order), out, scale=args.scale, seed=args.seed, complete=False,
                     figures=False)

    try:
        results = run_checks(ids or None, scale=args.scale, seed=args.seed, device=args.device, done=done,
                             on_start=on_start, on_result=checkpoint)
    except KeyboardInterrupt:
        n_new = len([r for r in finished if r.id not in done])
        kept = len(merge_results(done, finished, order))
        where = f"{out / 'report.json'}" if kept else "no report written"
        print(f"\nawt verify: interrupted after {n_new} new check(s); {kept} result(s) kept ({where}); "
              "rerun the same command with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_table(results))
    merged = merge_results(done, results, order)
    paths = write_report(merged, out, scale=args.scale, seed=args.seed)
    extra = len(merged) - len(results)
    note = f"; {extra} earlier result(s) kept in the report" if extra > 0 else ""
    print(f"\nreport: {paths['json']}  ({paths['md']}){note}")
    return EXIT_OK if all(r.passed for r in results) else EXIT_FAILED


def _experiment(argv: list[str]) -> int:
    """``awt experiment ...``: hand the arguments to ``empirical.cli.main``."""
    try:
        import importlib
        mod = importlib.import_module("empirical.cli")
    except ImportError as exc:
        if exc.name not in ("empirical", "empirical.cli"):
            raise           # empirical.cli exists but one of its imports is broken: a bug, not a usage error
        print(f"awt experiment: not available: the empirical package's command line (empirical.cli) "
              f"cannot be imported ({exc})", file=sys.stderr)
        return EXIT_USAGE
    code = mod.main(argv)
    return EXIT_OK if code is None else int(code)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="awt", description="Adversarial Winning Tickets: NTK theory, checked numerically, and the "
                                        "experiments that train.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{verify,experiment}")
    v = sub.add_parser("verify", help="run the numerical checks of the theory (docs/theory.md §C) and write a report",
                       description="Run the numerical checks of the theory and write report.json, report.md and "
                                   "one figure per check. Exit status: 0 all passed, 1 some check failed, 2 bad "
                                   "arguments, 130 interrupted (rerun with --resume).")
    v.add_argument("--list", action="store_true", help="list the registered checks (those of --only, if given) and exit")
    v.add_argument("--only", action="append", metavar="ID",
                   help="run only this check (repeatable; duplicates count once), e.g. --only C1")
    v.add_argument("--out", default="awt-report", help="output folder for report.json/report.md/figures (default: %(default)s)")
    v.add_argument("--scale", choices=("quick", "full"), default="quick", help="sweep size (default: %(default)s)")
    v.add_argument("--seed", type=int, default=0, help="base random seed, 0 .. 2**32-1 (default: %(default)s)")
    v.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="device for the checks that can use a GPU (default: %(default)s)")
    v.add_argument("--resume", action="store_true",
                   help="keep every result of the report in --out (same scale and seed) and run only the checks "
                        "it lacks; the report is rewritten after every check and never loses a result")
    v.set_defaults(func=_verify)
    sub.add_parser("experiment", add_help=False,
                   help="run a sweep of adversarial-training experiments (awt experiment --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "experiment":
        return _experiment(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:       # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

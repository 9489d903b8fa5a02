"""``awt experiment``: the sweep's command line (``main(argv) -> int``).

Settings come from, in increasing priority: the preset (``--preset default|mnist``), a TOML file
(``--config exp.toml``; its keys are :class:`empirical.experiment.ExperimentConfig`'s fields plus
``preset``, ``out``, ``executor`` and ``ray_address``; tables ``[hparams.<method>]`` and
``[model_options.<model>]``), and the flags. Example::

    # exp.toml
    methods = ["dense", "awt", "random"]
    densities = [0.1, 0.05]
    seeds = [0, 1]
    epochs = 3
    [hparams.awt]
    iterations = 100
    [model_options.mlp]
    widths = [256, 256]

    awt experiment --config exp.toml --out runs-exp --executor ray

Exit status: 0 when every run finished, 1 when a run failed (the others are kept and reported),
2 for bad input (an unknown name or key, a value out of range, a data root without the files, a
missing executor package): one line on stderr, before any run starts and with nothing written to
``--out``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser", "load_config", "config_from_args"]

CLI_KEYS = ("preset", "out", "executor", "ray_address")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and status 2, as argparse does, but catchable by main
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def build_parser(prog: str = "awt experiment") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=(
        "Search tickets, train them adversarially from their initialisation, evaluate them and track their "
        "kernels against the dense network: a resumable sweep over datasets, models, methods, densities, seeds "
        "and eps. With no arguments: digits, the MLP, densities 0.5/0.2/0.1/0.05, methods "
        "dense/awt/random/magnitude/snip/hydra, 3 seeds, PGD-10 l-inf eps 0.1."))
    p.add_argument("--config", metavar="TOML", help="settings file (keys: ExperimentConfig fields, preset, out, "
                                                     "executor, ray_address)")
    p.add_argument("--preset", choices=("default", "mnist"), help="start from a preset (default: default)")
    p.add_argument("--out", help="output folder (default: awt-experiment)")
    p.add_argument("--data-root", help="folder with the dataset files (mnist: the IDX files)")
    p.add_argument("--executor", help="local (default, sequential), ray or slurm")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local instance)")
    p.add_argument("--slurm-cluster", default=None,
                   help="submitit cluster for --executor slurm: slurm, local or debug (default: auto)")
    p.add_argument("--device", help="auto, cpu (default) or cuda")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="skip finished runs, resume half-finished ones from their checkpoint (default)")
    g.add_argument("--fresh", dest="resume", action="store_false", help="delete earlier runs in --out first")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1: the same numbers whichever executor runs it)")
    a = p.add_argument_group("sweep axes (comma-separated)")
    a.add_argument("--datasets", "--dataset", type=_names)
    a.add_argument("--models", "--model", type=_names)
    a.add_argument("--methods", "--method", type=_names)
    a.add_argument("--densities", "--density", type=_floats)
    a.add_argument("--seeds", type=_ints, help="seed list, e.g. 0,1,2")
    a.add_argument("--eps", type=_floats, help="attack radii, e.g. 0.1 (0 = standard training)")
    s = p.add_argument_group("shared settings")
    s.add_argument("--steps", type=int, help="PGD steps in training (and evaluation unless --eval-steps)")
    s.add_argument("--alpha", type=float, help="PGD step size (default: the attack's)")
    s.add_argument("--norm", help="linf or l2")
    s.add_argument("--epochs", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--optimizer", help="sgd or adam")
    s.add_argument("--schedule", help="learning-rate schedule name (adversarial_train's)")
    s.add_argument("--n-train", type=int, help="stratified training subset size")
    s.add_argument("--n-test", type=int, help="stratified test subset size")
    s.add_argument("--n-eval", type=int, help="evaluate on the first N test points")
    s.add_argument("--eval-steps", type=int)
    s.add_argument("--eval-restarts", type=int)
    s.add_argument("--no-cross-check", dest="cross_check", action="store_const", const=False, default=None)
    s.add_argument("--probe-clean", type=int)
    s.add_argument("--probe-adv", type=int)
    s.add_argument("--widths", type=_ints, help="hidden widths of the mlp model, e.g. 512,512")
    s.add_argument("--scope", help="layerwise or global")
    return p


def _read_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from .experiment import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: {path!r} is not a file")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path}: not valid TOML ({exc})") from None


def load_config(path: str, preset_name: str | None = None):
    """(ExperimentConfig, CLI-level settings) from a TOML file (see the module docstring), over the
    preset ``preset_name`` (a flag), else the file's ``preset``, else the defaults."""
    from .experiment import ConfigError, preset

    raw = _read_toml(path)
    cli = {k: raw.pop(k) for k in CLI_KEYS if k in raw}
    for k in ("preset", "out", "executor", "ray_address"):
        if k in cli and not isinstance(cli[k], str):
            raise ConfigError(f"config: {k} must be a string, got {cli[k]!r}")
    from .experiment import ExperimentConfig

    return ExperimentConfig.from_dict(raw, base=preset(preset_name or cli.get("preset", "default"))), cli


_FLAG_KEYS = ("datasets", "models", "methods", "densities", "seeds", "eps", "steps", "alpha", "norm", "epochs",
              "lr", "batch_size", "optimizer", "schedule", "n_train", "n_test", "n_eval", "eval_steps",
              "eval_restarts", "cross_check", "probe_clean", "probe_adv", "scope", "device", "data_root")


def config_from_args(args: argparse.Namespace):
    """(ExperimentConfig, out, executor, ray_address) from parsed flags (priority: flags > TOML > preset)."""
    from .experiment import ExperimentConfig, preset

    cli: dict[str, Any] = {}
    if args.config:
        config, cli = load_config(args.config, args.preset)
    else:
        config = preset(args.preset or "default")
    changes = {k: getattr(args, k) for k in _FLAG_KEYS if getattr(args, k, None) is not None}
    if args.widths is not None:
        opts = {m: dict(v) for m, v in config.model_options.items()}
        opts.setdefault("mlp", {})["widths"] = tuple(args.widths)
        changes["model_options"] = opts
    if changes:
        config = ExperimentConfig.from_dict(changes, base=config)
    out = args.out or cli.get("out") or "awt-experiment"
    executor = args.executor or cli.get("executor") or "local"
    ray_address = args.ray_address or cli.get("ray_address")
    return config, out, executor, ray_address


def _fail(msg: str) -> int:
    print(f"awt experiment: error: {msg}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    from .executors import EXECUTORS, ExecutorUnavailable, make_executor
    from .experiment import ConfigError, run_experiment, validate

    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _UsageError as exc:
        return _fail(str(exc))
    except SystemExit as exc:   # --help
        return int(exc.code or 0)
    try:
        config, out, executor, ray_address = config_from_args(args)
        if executor not in EXECUTORS:
            raise ConfigError(f"--executor: {executor!r} is not one of {', '.join(EXECUTORS)}")
        if args.threads < 1:
            raise ConfigError(f"--threads: {args.threads} must be >= 1")
        validate(config)
        opts: dict[str, Any] = {"device": config.device}
        if executor == "ray":
            opts["ray_address"] = ray_address
        if executor == "slurm":
            opts["folder"] = Path(out) / "submitit"
            opts["cluster"] = args.slurm_cluster
        exe = make_executor(executor, **opts)
    except ConfigError as exc:
        return _fail(str(exc))
    except ExecutorUnavailable as exc:
        return _fail(str(exc))
    except ValueError as exc:
        return _fail(" ".join(str(exc).split()))
    try:
        res = run_experiment(config, out, executor=exe, resume=args.resume, progress=args.progress,
                             threads=args.threads, validated=True)
    finally:
        exe.close()
    print(f"awt experiment: {len(res.records)} runs finished ({res.skipped} reused), {len(res.failed)} failed, "
          f"{res.seconds:.1f} s; summary: {res.files.get('summary')}", file=sys.stderr)
    for f in res.failed:
        print(f"  failed: {f.get('method')} d={f.get('density')} seed={f.get('seed')}: {f.get('error')}",
              file=sys.stderr)
    return 1 if res.failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

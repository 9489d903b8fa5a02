"""Dense-versus-ticket NTK distance on held-out adversarial points at initialisation (issue 10, Targets).

For each (dataset/model, density, seed) and each ticket method, the ticket is searched on the dense
initialisation of that seed (:func:`empirical.tickets.find_ticket`, layerwise, first layer dense), and
its trace NTK ``Θ_ticket`` on ``n_eval`` held-out adversarial points is compared with the dense network's
``Θ_0`` (:func:`ntk_theory.empirical.empirical_ntk`, ``mode="trace"``; the ticket as
``apply_mask(init_state, mask, rescale=ticket.rescale)``, its sub-network kernel):

    kernel distance  d(Θ_t, Θ_0) = 1 - <Θ_t, Θ_0>_F / (||Θ_t||_F ||Θ_0||_F)   (scale-invariant),
    relative error   r(Θ_t, Θ_0) = ||Θ_t - Θ_0||_F / ||Θ_0||_F                (scale-sensitive),

the held-out adversarial points being PGD-``steps`` at ``eps`` (l-inf) against the dense network at
init on ``n_eval`` test points with their true labels (never seen by any search). The relative output
distance ``||f_t - f_0|| / ||f_0||`` on the same points is reported too.

Run (the README's figures; 1 core):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kernel_table.py --out docs/kernel_table.md
``--quick`` shrinks everything for a smoke run. Sizes are printed into the table's header.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from empirical import data as D  # noqa: E402
from empirical import models as Mo  # noqa: E402
from empirical.tickets import find_ticket  # noqa: E402
from ntk_theory.attacks import pgd  # noqa: E402
from ntk_theory.empirical import empirical_ntk  # noqa: E402
from ntk_theory.io import atomic_write_json, atomic_write_text  # noqa: E402
from ntk_theory.masks import apply_mask  # noqa: E402
from ntk_theory.metrics import kernel_distance, relative_frobenius  # noqa: E402

# (label, method, hparams); attack settings of the searches that attack are added from the run
METHODS = [
    ("random", "random", {}),
    ("random+rescale", "random", {"rescale": True}),
    ("magnitude", "magnitude", {}),
    ("snip", "snip", {}),
    ("grasp", "grasp", {}),
    ("synflow", "synflow", {}),
    ("hydra", "hydra", {"epochs": 2}),
    ("adv_imp", "adv_imp", {"epochs": 1}),
    ("awt (subnetwork)", "awt", {"mode": "subnetwork"}),
    ("awt (ntt)", "awt", {"mode": "ntt"}),
]
ATTACKING = {"hydra", "adv_imp", "awt"}


def setups(args):
    """(label, dataset, model factory) for the two architectures of issue 10."""
    out = []
    if "digits" in args.datasets:
        ds = D.load("digits", seed=0)
        if args.n_train:
            ds = ds.subset(n_train=min(args.n_train, ds.n_train), seed=0)
        out.append(("digits MLP 64-512-512-10", ds,
                    lambda seed: Mo.build("mlp", in_shape=ds.input_shape, num_classes=10, seed=seed)))
    if "mnist" in args.datasets:
        ms = D.load("mnist", root=args.mnist_root, seed=0)
        ms = ms.subset(n_train=min(args.n_train or ms.n_train, ms.n_train), seed=0)
        out.append(("MNIST LeNet-300-100", ms,
                    lambda seed: Mo.build("lenet300_100", in_shape=ms.input_shape, num_classes=10, seed=seed)))
    return out


def held_out(model, ds, n_eval, eps, steps, seed):
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(ds.x_test.shape[0], generator=g)[:n_eval]
    x, y = ds.x_test[idx], ds.y_test[idx]
    xa = pgd(model.eval(), x, y, eps=eps, steps=steps, norm="linf", generator=seed)
    return xa


def ticket_net(model, ticket):
    net = copy.deepcopy(model)
    net.load_state_dict(ticket.init_state)
    return apply_mask(net, ticket.mask, rescale=ticket.rescale)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "mnist"])
    p.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.05])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None, help="labels of METHODS to run (default: all)")
    p.add_argument("--n-train", type=int, default=1024, help="training examples the searches see")
    p.add_argument("--n-eval", type=int, default=128, help="held-out adversarial points")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--mnist-root", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--awt", default="{}", help="JSON hparams added to both AWT modes")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "kernel_table.md"))
    args = p.parse_args(argv)
    awt_extra = json.loads(args.awt)
    methods = [m for m in METHODS if args.methods is None or m[0] in args.methods]
    if args.quick:
        args.seeds, args.n_eval, args.n_train = args.seeds[:1], 32, 256
        awt_extra = {"train_steps": 20, "n_train": 128, **awt_extra}
    rows, t_all = [], time.perf_counter()
    for label, ds, make in setups(args):
        for q in args.densities:
            for seed in args.seeds:
                model = make(seed)
                xa = held_out(model, ds, args.n_eval, args.eps, args.steps, seed)
                K0 = empirical_ntk(model, xa, mode="trace").double()
                with torch.no_grad():
                    f0 = model(xa).double()
                for name, method, hp in methods:
                    hp = dict(hp)
                    if method in ATTACKING:
                        hp.update(eps=args.eps, norm="linf", steps=args.steps)
                    if method == "awt":
                        hp.update(awt_extra)
                    if method == "adv_imp" and args.quick:
                        hp.update(steps=2)
                    t0 = time.perf_counter()
                    ticket = find_ticket(method, model, ds, q, seed=seed, device="cpu", progress=False, **hp)
                    net = ticket_net(model, ticket)
                    K = empirical_ntk(net, xa, mode="trace").double()
                    with torch.no_grad():
                        f = net(xa).double()
                    row = {"setup": label, "density": q, "seed": seed, "method": name,
                           "kernel_distance": float(kernel_distance(K, K0)),
                           "relative_frobenius": float(relative_frobenius(K, K0)),
                           "output_distance": float(torch.linalg.vector_norm(f - f0) / torch.linalg.vector_norm(f0)),
                           "search_seconds": ticket.search_seconds, "seconds": time.perf_counter() - t0}
                    rows.append(row)
                    print(f"{label} q={q:g} seed={seed} {name:18s} d={row['kernel_distance']:.5f} "
                          f"r={row['relative_frobenius']:.4f} out={row['output_distance']:.3f} "
                          f"({row['seconds']:.1f} s)", flush=True)
    total = time.perf_counter() - t_all
    md = render(rows, args, methods, total)
    out = Path(args.out)
    atomic_write_text(out, md)
    atomic_write_json(out.with_suffix(".json"), {"rows": rows, "args": vars(args), "seconds": total})
    print(md)
    return 0


def _stats(v):
    m = sum(v) / len(v)
    sd = math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd


def render(rows, args, methods, total) -> str:
    cols = []
    for r in rows:
        c = (r["setup"], r["density"])
        if c not in cols:
            cols.append(c)
    lines = [f"Held-out adversarial points: {args.n_eval} test points, PGD-{args.steps} l-inf eps={args.eps} "
             f"against the dense net at init; searches see {args.n_train} training points; seeds {args.seeds}; "
             f"layerwise, first layer dense; {total / 60:.1f} min on {torch.get_num_threads()} thread(s).", ""]
    for metric, title in (("kernel_distance", "kernel distance 1 - cos(Θ_t, Θ_0)"),
                          ("relative_frobenius", "relative error ||Θ_t - Θ_0||_F / ||Θ_0||_F"),
                          ("output_distance", "output distance ||f_t - f_0|| / ||f_0||")):
        lines += [f"**{title}** (mean ± sd over seeds; best per column in bold)", ""]
        lines.append("| method | " + " | ".join(f"{s} q={q:g}" for s, q in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        means = {}
        for name, _, _ in methods:
            for c in cols:
                v = [r[metric] for r in rows if (r["setup"], r["density"]) == c and r["method"] == name]
                if v:
                    means[name, c] = _stats(v)
        best = {c: min((means[n, c][0] for n, _, _ in methods if (n, c) in means), default=None) for c in cols}
        for name, _, _ in methods:
            cells = []
            for c in cols:
                if (name, c) not in means:
                    cells.append("-")
                    continue
                m, sd = means[name, c]
                cell = f"{m:.4g} ± {sd:.2g}"
                cells.append(f"**{cell}**" if m == best[c] else cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

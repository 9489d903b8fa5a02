"""proofs_checks' machinery: the registry and its registration API, the statistics, the report
(figures, merging) and the shared helpers. The checks have one test file each
(test_check_cNN.py); the command line is tested in test_cli.py."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

from proofs_checks import registry as reg_mod
from proofs_checks.common import one_intra_op_thread, sphere_inputs
from proofs_checks.registry import CheckResult, Outcome, get_check, register, registry, run_checks
from proofs_checks.report import figure, merge_results, plot_result, read_resumable, write_report
from proofs_checks.stats import bootstrap_slope, loglog_slope

PARAMS = {"quick": dict(n=3, scale_factor=1.0), "full": dict(n=5, scale_factor=1.0)}


@pytest.fixture
def isolated(monkeypatch):
    """A registry copy: checks registered by a test disappear after it."""
    registry()      # load the real checks first
    monkeypatch.setattr(reg_mod, "_REGISTRY", dict(reg_mod._REGISTRY))
    return reg_mod


def _toy(isolated, cid="C90"):
    calls = []

    @register(cid, title="toy", statement="a toy statement", rigour="heuristic", params=PARAMS)
    def check_toy(p, seed, *, planted: float = 0.0) -> Outcome:
        calls.append((dict(p), seed, planted))
        return Outcome(parameters=dict(planted=planted), measured=dict(value=p["n"] * p["scale_factor"] + planted),
                       expected=dict(value=p["n"]), passed=planted == 0.0,
                       details=dict(series=dict(x=[1, 2], y={"v": [1.0, 2.0]})))
    return check_toy, calls


# --------------------------------------------------------------------------------------------- registry
def test_registry_lists_the_checks_in_numeric_order_with_their_rigour():
    reg = registry()
    assert {"C1", "C2", "C3", "C4", "C5", "C6", "C7", "C10", "C11", "C12"} <= set(reg)
    assert [int(i[1:]) for i in reg] == sorted(int(i[1:]) for i in reg)     # C2 before C10
    rig = {cid: c.rigour for cid, c in reg.items()}
    assert rig["C4"] == rig["C7"] == "heuristic"
    assert all(rig[c] == "theorem" for c in ("C1", "C2", "C3", "C5", "C6", "C10", "C11", "C12"))


def test_register_fills_id_statement_rigour_parameters_and_time(isolated):
    run, calls = _toy(isolated)
    res = run("full", 7, planted=0.0)
    assert isinstance(res, CheckResult)
    assert (res.id, res.statement, res.rigour, res.passed) == ("C90", "a toy statement", "heuristic", True)
    assert res.parameters == dict(n=5, scale_factor=1.0, seed=7, planted=0.0)
    assert res.seconds >= 0 and calls == [(dict(n=5, scale_factor=1.0), 7, 0.0)]
    assert get_check("C90").run is run and get_check("C90").keywords == ("planted",)
    with pytest.raises(Exception):              # results are frozen
        res.passed = False
    back = CheckResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.to_dict() == res.to_dict() and back.details == res.details


def test_overrides_replace_sweep_entries_and_set_planted_ingredients(isolated):
    run, calls = _toy(isolated)
    res = run("quick", 0, n=9, planted=1.5)
    assert calls[-1] == (dict(n=9, scale_factor=1.0), 0, 1.5)
    assert res.measured["value"] == 10.5 and not res.passed
    assert run("quick").parameters["n"] == 3          # the declared sweep is not changed by an override


def test_an_unknown_override_is_refused_before_any_work(isolated):
    # Was: every check did p.update(overrides), so a typo like widht= was silently ignored
    run, calls = _toy(isolated)
    with pytest.raises(ValueError, match=r"widht: not a parameter of check C90; accepted: n, scale_factor .*planted"):
        run("quick", 0, widht=3)
    assert calls == []
    with pytest.raises(ValueError, match="widht"):
        get_check("C1").run("quick", 0, widht=64)   # a real check too


@pytest.mark.parametrize("cid", ["C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9", "C10", "C11", "C12", "C13"])
def test_every_check_refuses_a_typo(cid):
    with pytest.raises(ValueError, match="not a parameter of check"):
        get_check(cid).run("quick", 0, widht=64)


@pytest.mark.parametrize("seed, err", [(-1, ValueError), (2 ** 32, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_seed_and_scale_are_refused(isolated, seed, err):
    run, calls = _toy(isolated)
    with pytest.raises(err, match="seed"):
        run("quick", seed)
    with pytest.raises(ValueError, match="scale"):
        run("huge", 0)
    with pytest.raises(err, match="seed"):
        run_checks(["C90"], seed=seed)
    assert calls == []


def test_register_validates_its_declaration(isolated):
    body = lambda p, seed: None   # noqa: E731
    with pytest.raises(ValueError, match="rigour"):
        register("C91", title="t", statement="s", rigour="conjecture", params=PARAMS)
    with pytest.raises(ValueError, match="params"):
        register("C91", title="t", statement="s", rigour="theorem", params={"quick": {}})
    with pytest.raises(ValueError, match="same keys"):
        register("C91", title="t", statement="s", rigour="theorem", params={"quick": dict(a=1), "full": dict(b=1)})
    with pytest.raises(ValueError, match="already registered"):
        register("C1", title="t", statement="s", rigour="theorem", params=PARAMS)(body)

    def positional_extra(p, seed, planted):
        pass
    with pytest.raises(TypeError, match="keyword-only"):
        register("C91", title="t", statement="s", rigour="theorem", params=PARAMS)(positional_extra)

    def clash(p, seed, *, n=1):
        pass
    with pytest.raises(ValueError, match="both sweep parameters and keyword"):
        register("C91", title="t", statement="s", rigour="theorem", params=PARAMS)(clash)


def test_a_body_must_return_an_outcome(isolated):
    @register("C92", title="t", statement="s", rigour="theorem", params=PARAMS)
    def bad(p, seed):
        return dict(passed=True)
    with pytest.raises(TypeError, match="Outcome"):
        bad()


def test_get_check_error_names_its_argument_not_a_cli_flag():
    # Was: registry.get_check raised "only: unknown check id ..." (a library error naming a CLI flag)
    with pytest.raises(ValueError) as exc:
        get_check("C999")
    msg = str(exc.value)
    assert msg.startswith("id: unknown check 'C999'") and "only" not in msg and "C12" in msg


def test_device_goes_only_to_checks_that_declare_it(isolated):
    seen = []

    @register("C93", title="t", statement="s", rigour="theorem", params=PARAMS)
    def gpu_ready(p, seed, *, device):
        seen.append(device)
        return Outcome({}, {}, {}, True)
    assert get_check("C93").takes_device and not get_check("C1").takes_device
    run_checks(["C93"], device="cpu")
    gpu_ready()
    assert seen == [torch.device("cpu")] * 2
    with pytest.raises(ValueError, match="device"):
        gpu_ready(device="tpu")


def test_run_checks_deduplicates_and_keeps_registry_order(isolated):
    log = []

    def make(cid):
        def body(p, seed):
            log.append(cid)
            return Outcome({}, {}, {}, True)
        return body
    for cid in ("C95", "C94"):
        register(cid, title="t", statement="s", rigour="theorem", params=PARAMS)(make(cid))
    res = run_checks(["C95", "C94", "C95"])
    assert [r.id for r in res] == ["C94", "C95"] and log == ["C94", "C95"]


# --------------------------------------------------------------------------------------------- common helpers
def test_sphere_inputs_lie_on_the_sphere_of_radius_sqrt_d():
    x = sphere_inputs(7, 5, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float64 and x.shape == (7, 5)
    torch.testing.assert_close(x.norm(dim=1), torch.full((7,), math.sqrt(5), dtype=torch.float64))


def test_one_intra_op_thread_restores_the_setting_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with one_intra_op_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


SMALL = {   # each check at a reduced scale (a few tenths of a second each)
    "C1": dict(widths=[64, 128], seeds=2, n_points=4),
    "C2": dict(widths=[64, 128], densities=[0.5], seeds=2, n_points=4),
    "C3": dict(width=64, seeds=2, densities=[0.5]),
    "C4": dict(widths=[64, 128, 256], seeds=2),
    "C5": dict(configs=[dict(depth=1, widths=[64, 128])], seeds=2, kernel_every=8, n_test=4, n_train=4),
    "C6": dict(width=64, densities=[0.5], seeds=2, n_tau=8, n_points=4),
    "C7": dict(eps=[1e-3, 1e-2], n_points=4),
    "C10": dict(ns=[4, 6], draws=3, n_boot=10),
    "C11": dict(gd_steps=5, n_times=4),
    "C12": dict(depths=[1], draws=1, adv_eps=[0.01], adv_attacks=["fgsm"], adv_datasets=["generic"],
                deltas=[0.05, 0.1, 0.2]),
    "C8": dict(seeds=2, train_steps=6, n_test=30, n_tau=4),
    "C9": dict(widths=[64, 128], seeds=1, train_steps=3),
    "C13": dict(widths=[64, 128], densities=[0.2], seeds=1, awt_steps=5, n_search=64, n_probe=16, at_train=8,
                at_steps=3),
}


def test_every_check_shows_a_progress_bar_over_its_whole_sweep(monkeypatch):
    # Was: C11 had no bar, and the others had one over their outer loop only (C3 at full scale: 5 steps in 6.5 min)
    import tqdm.auto
    bars = []

    class Recorder:
        def __init__(self, iterable=None, *, desc=None, total=None, leave=True, disable=False, **kw):
            self.iterable, self.desc, self.leave, self.disable = iterable, desc, leave, disable
            self.total = len(iterable) if total is None and iterable is not None else total
            self.n = 0
            bars.append(self)

        def __iter__(self):
            for v in self.iterable:
                yield v
                self.n += 1

        def update(self, k=1):
            self.n += k

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    for cid, chk in registry().items():
        bars.clear()
        chk.run("quick", 0, **SMALL.get(cid, {}))
        assert bars, f"{cid} shows no progress bar"
        assert all(b.disable is None and b.leave is False for b in bars), cid      # silent off a terminal
        assert sum(b.total for b in bars) >= 2 and all(b.n == b.total for b in bars), (cid, [(b.n, b.total) for b in bars])


# --------------------------------------------------------------------------------------------- stats
def test_loglog_slope_and_bootstrap_recover_a_known_power_law():
    rng = np.random.default_rng(0)
    x = np.array([64, 128, 256, 512, 1024])
    samples = [3.0 * xi ** -0.5 * np.exp(0.05 * rng.standard_normal(8)) for xi in x]
    slope, (lo, hi) = bootstrap_slope(x, samples, n_boot=500)
    assert abs(slope + 0.5) < 0.05 and lo < slope < hi
    assert loglog_slope(x, 2.0 * x ** 1.5) == pytest.approx(1.5)


def test_loglog_slope_matches_scipy_linregress():
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = np.sort(rng.uniform(1, 1e4, rng.integers(2, 9)))
        y = np.exp(rng.normal(size=x.size))
        ref = scipy.stats.linregress(np.log(x), np.log(y)).slope
        assert loglog_slope(x, y) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_bootstrap_slope_matches_an_independent_reimplementation():
    rng = np.random.default_rng(4)
    x = np.array([64, 128, 256, 512, 1024.0])
    samples = [2.0 * xi ** -0.5 * np.exp(0.3 * rng.standard_normal(int(rng.integers(3, 9)))) for xi in x]
    slope, (lo, hi) = bootstrap_slope(x, samples, n_boot=300, level=0.9, seed=11)
    # reference: resample seeds independently at each x with the same generator stream, fit with scipy
    r = np.random.default_rng(11)
    boots = []
    for _ in range(300):
        means = [s[r.integers(0, len(s), len(s))].mean() for s in samples]
        boots.append(scipy.stats.linregress(np.log(x), np.log(means)).slope)
    ref = scipy.stats.linregress(np.log(x), np.log([s.mean() for s in samples])).slope
    assert slope == pytest.approx(ref, rel=1e-10)
    assert lo == pytest.approx(np.quantile(boots, 0.05), rel=1e-10)
    assert hi == pytest.approx(np.quantile(boots, 0.95), rel=1e-10)
    # the statistic is the slope of the log of the *mean*, not the mean of the logs
    assert slope != pytest.approx(scipy.stats.linregress(np.log(x), [np.log(s).mean() for s in samples]).slope,
                                  rel=1e-6)


def test_bias_z_is_about_one_without_bias_and_grows_with_it():
    from proofs_checks.stats import bias_z
    g = torch.Generator().manual_seed(0)
    widths = [64, 256, 1024]
    limit = torch.zeros(20)
    ks = [torch.randn(8, 20, generator=g, dtype=torch.float64) / w ** 0.5 for w in widths]
    z0 = bias_z(widths, ks, limit)
    assert 0.5 < z0 < 1.6
    assert bias_z(widths, ks, limit + 0.05) > 3 * z0


def test_bias_z_rejects_mismatched_inputs():
    from proofs_checks.stats import bias_z
    k = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="kernels"):
        bias_z([64, 128], [k], torch.zeros(3))
    with pytest.raises(ValueError, match=r"kernels\[0\]"):
        bias_z([64], [k], torch.zeros(2))
    with pytest.raises(ValueError, match=r"kernels\[0\]"):
        bias_z([64], [k[:1]], torch.zeros(3))  # one seed: no standard error


# --------------------------------------------------------------------------------------------- report
def _result(cid="C2", x=(128, 256, 512, 1024), loglog=True, passed=True, **measured):
    return CheckResult(id=cid, statement="s", rigour="theorem", parameters={}, measured=measured or dict(v=1.0),
                       expected={}, passed=passed,
                       details=dict(series=dict(x=list(x), y={"err": [1.0 / (i + 1) for i in range(len(x))]},
                                                xlabel="width n", ylabel="error", loglog=loglog)))


def _labels(fig):
    fig.canvas.draw()
    return [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]


@pytest.mark.parametrize("x", [(128, 256, 512, 1024), (64, 128, 256, 512, 1024, 2048), (512, 2048, 8192, 32768)])
def test_width_axes_have_plain_integer_ticks(x):
    # Was: C2's axis (widths 128..1024, less than a decade) showed the tick "1.02e+03"
    import matplotlib.pyplot as plt
    fig = figure(_result(x=x))
    try:
        labels = _labels(fig)
        assert labels == [str(v) for v in x]
    finally:
        plt.close(fig)


def test_non_integer_axes_keep_readable_ticks():
    import matplotlib.pyplot as plt
    fig = figure(_result(x=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2)))
    try:
        assert not any("e+" in t for t in _labels(fig))
    finally:
        plt.close(fig)


def test_c6_figure_draws_what_the_table_reports():
    # Was: the figure drew the mean over seeds labelled "sup gap / bound" while the table reported the max
    from proofs_checks.checks.c06_dynamics_perturbation import check_c6
    res = check_c6("quick", 0)
    series = res.details["series"]
    (label, ys), *_ = series["y"].items()
    assert label.startswith("max over seeds")
    assert max(ys) == pytest.approx(res.measured["max_gap_over_bound"], rel=1e-12)
    for q, y in zip(series["x"], ys):
        assert y == max(r["ratio"] for r in res.details["rows"] if r["density"] == q and "ratio" in r)
    assert "mean" in list(series["y"])[1]


def test_plot_result_writes_a_png_atomically(tmp_path):
    path = plot_result(_result(), tmp_path / "C2.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*.tmp"))
    assert plot_result(CheckResult("C3", "s", "theorem", {}, {}, {}, True), tmp_path / "C3.png") is None


def test_merge_results_keeps_every_earlier_result_and_prefers_new_ones():
    a, b, c = _result("C1"), _result("C2"), _result("C7")
    b2 = _result("C2", passed=False)
    merged = merge_results({"C7": c, "C1": a, "C2": b}, [b2], order=["C1", "C2", "C7"])
    assert [r.id for r in merged] == ["C1", "C2", "C7"] and merged[1] is b2
    assert [r.id for r in merge_results({"C99": _result("C99")}, [c], order=["C7"])] == ["C7", "C99"]


def test_read_resumable_refuses_reports_it_would_overwrite(tmp_path):
    assert read_resumable(tmp_path, scale="quick", seed=0)[0] == {}
    write_report([_result("C1")], tmp_path, scale="quick", seed=0)
    done, why = read_resumable(tmp_path, scale="quick", seed=0)
    assert list(done) == ["C1"] and "resuming" in why
    assert done["C1"].details == _result("C1").details
    with pytest.raises(ValueError, match="scale 'quick', seed 0"):
        read_resumable(tmp_path, scale="full", seed=0)
    with pytest.raises(ValueError, match="seed 0"):
        read_resumable(tmp_path, scale="quick", seed=1)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable awt report"):
        read_resumable(tmp_path, scale="quick", seed=0)

"""Shared by the benchmark files (not a benchmark: pytest collects ``bench_*.py`` only)."""


def write_lines(request, lines) -> None:
    """Print ``lines`` to the terminal at the end of a benchmark module (outside pytest's capture):
    the summary tables the benchmark files compute beside pytest-benchmark's own."""
    cap = request.config.pluginmanager.getplugin("capturemanager")
    rep = request.config.pluginmanager.getplugin("terminalreporter")
    if cap is None or rep is None:
        return
    with cap.global_and_fixture_disabled():
        for line in lines:
            rep.write_line(line)

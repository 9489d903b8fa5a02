"""Where the runs of a sweep execute: in this process, on Ray, or on Slurm (DESIGN.md "Scale-out").

An executor maps a module-level function over a list of calls ``(args, kwargs)`` and yields the
results *as they finish* (not in submission order). Nothing else in awt knows which executor ran a
run: each run is a pure function of its configuration that writes its own files
(:func:`empirical.experiment.execute`), so all three give the same files and numbers for the same
seeds on CPU.

* :class:`LocalExecutor` (``"local"``, the default): one call after the other, no extra package.
* :class:`RayExecutor` (``"ray"``, extra ``awt[ray]``): one Ray core task per call
  (``num_cpus=1``, ``num_gpus=1`` per task when the runs use CUDA). ``address=None`` starts a local
  instance (``ray.init(num_cpus=2, include_dashboard=False)``) that :meth:`close` shuts down;
  ``address="auto"`` or ``"ray://host:10001"`` joins an existing cluster. A Ray instance that is
  already running in this process is used and left running.
* :class:`SlurmExecutor` (``"slurm"``, extra ``awt[slurm]``): one submitit job array, one array
  element per call; ``cluster="local"`` runs the jobs as local subprocesses through submitit's
  ``LocalExecutor`` (what the tests use), ``cluster=None`` lets submitit pick Slurm when present.
"""
from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "SlurmExecutor", "ExecutorUnavailable",
           "make_executor", "EXECUTORS"]

Call = tuple[Sequence[Any], Mapping[str, Any]]


class ExecutorUnavailable(ImportError):
    """The package an executor needs is not installed (the message says which extra installs it)."""


def _require(module: str, executor: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExecutorUnavailable(
            f"executor {executor!r} needs the {module!r} package, which is not installed ({exc}); "
            f"install it with: pip install 'awt[{extra}]'") from None


def _call(fn: Callable, args: Sequence[Any], kwargs: Mapping[str, Any]):
    return fn(*args, **kwargs)


class Executor:
    """Base class: ``map(fn, calls)`` yields ``fn(*args, **kwargs)`` for each call as it finishes;
    ``close()`` releases what the executor started. Usable as a context manager."""

    name = "base"

    def map(self, fn: Callable, calls: Iterable[Call]) -> Iterator[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """Sequential, in this process."""

    name = "local"

    def map(self, fn: Callable, calls: Iterable[Call]) -> Iterator[Any]:
        for args, kwargs in calls:
            yield fn(*args, **kwargs)


class RayExecutor(Executor):
    """One Ray task per call, results gathered with ``ray.wait`` as they finish.

    ``address``: ``None`` starts a local instance with ``num_cpus`` CPUs and no dashboard (shut
    down by :meth:`close`); anything else is passed to ``ray.init(address=...)`` to join a cluster
    (left running). ``num_gpus``: GPUs per task (use 1 for CUDA runs); ``num_cpus_per_task``: CPUs
    per task (1: as many runs in parallel as the instance has CPUs).
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = 2, num_gpus: float = 0,
                 num_cpus_per_task: float = 1, init_kwargs: Mapping[str, Any] | None = None):
        self.ray = _require("ray", "ray", "ray")
        if num_gpus < 0 or num_cpus_per_task <= 0:
            raise ValueError(f"num_gpus={num_gpus!r} must be >= 0 and num_cpus_per_task={num_cpus_per_task!r} > 0")
        self.num_gpus, self.num_cpus_per_task = float(num_gpus), float(num_cpus_per_task)
        self._started = False
        if not self.ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
            if address is None:
                kw["num_cpus"] = num_cpus
            else:
                kw["address"] = address
            kw.update(init_kwargs or {})
            self.ray.init(**kw)
            self._started = True

    def map(self, fn: Callable, calls: Iterable[Call]) -> Iterator[Any]:
        ray = self.ray
        task = ray.remote(num_cpus=self.num_cpus_per_task, num_gpus=self.num_gpus, max_retries=0)(_call)
        pending = [task.remote(fn, tuple(args), dict(kwargs)) for args, kwargs in calls]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])

    def close(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False


class SlurmExecutor(Executor):
    """One submitit job array (one element per call), polled until every element has finished.

    ``folder``: where submitit writes its job files and logs. ``cluster``: ``None`` (Slurm when
    ``sbatch`` is present, else local), ``"slurm"``, ``"local"`` or ``"debug"`` (in-process).
    ``parameters``: passed to ``update_parameters`` (``timeout_min``, ``slurm_partition``,
    ``cpus_per_task``, ``gpus_per_node``, ``slurm_array_parallelism``, ...); ``gpus_per_node=1`` is
    added for CUDA runs by :func:`make_executor`.
    """

    name = "slurm"

    def __init__(self, folder: str | os.PathLike, *, cluster: str | None = None,
                 parameters: Mapping[str, Any] | None = None, poll_seconds: float = 0.5):
        self.submitit = _require("submitit", "slurm", "slurm")
        self.folder = Path(folder)
        self.cluster, self.poll_seconds = cluster, float(poll_seconds)
        self.parameters = {"timeout_min": 24 * 60, **dict(parameters or {})}

    def map(self, fn: Callable, calls: Iterable[Call]) -> Iterator[Any]:
        calls = list(calls)
        if not calls:
            return
        executor = self.submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=self.cluster)
        executor.update_parameters(**self.parameters)
        jobs = executor.map_array(_call, [fn] * len(calls), [tuple(a) for a, _ in calls],
                                  [dict(k) for _, k in calls])
        pending = list(jobs)
        while pending:
            still = []
            for job in pending:
                if job.done():
                    yield job.result()
                else:
                    still.append(job)
            pending = still
            if pending:
                time.sleep(self.poll_seconds)


EXECUTORS = ("local", "ray", "slurm")


def make_executor(name: str = "local", *, device: str = "cpu", ray_address: str | None = None,
                  num_cpus: int | None = 2, folder: str | os.PathLike | None = None,
                  cluster: str | None = None, parameters: Mapping[str, Any] | None = None) -> Executor:
    """The executor called ``name`` (one of :data:`EXECUTORS`), with a GPU per task when ``device``
    asks for CUDA (``"cuda"``, or ``"auto"`` where CUDA is present)."""
    if not isinstance(name, str) or name not in EXECUTORS:
        raise ValueError(f"executor: {name!r} is not one of {', '.join(EXECUTORS)}")
    cuda = str(device).startswith("cuda")
    if device == "auto":
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:  # pragma: no cover
            cuda = False
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(ray_address, num_cpus=num_cpus if ray_address is None else None,
                           num_gpus=1 if cuda else 0)
    params = dict(parameters or {})
    if cuda:
        params.setdefault("gpus_per_node", 1)
    return SlurmExecutor(folder if folder is not None else "submitit", cluster=cluster, parameters=params)

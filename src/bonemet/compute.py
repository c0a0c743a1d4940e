"""Where per-case work runs: a process pool on this machine, or a Dask cluster (params ``compute``).

The preprocess and extract stages hand their cases to :func:`case_executor`, which gives a
:class:`concurrent.futures.Executor` either way: a ``ProcessPoolExecutor`` for
``compute.scheduler: local``, or the ``concurrent.futures`` face of a ``dask.distributed``
client (``Client.get_executor``) for ``compute.scheduler: dask``. The task functions are the
same, so the outputs are too (tests/test_compute.py). This module is the only import of dask
(tests/test_layers.py).

On a cluster the tasks read and write the paths the stage gives them (the cohort, the output
folder's temporary sibling, the radiomics cache): the workers need bonemet installed and those
paths on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from bonemet.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import ComputeSpec

log = logging.getLogger(__name__)


class SchedulerUnavailableError(UserError, ConnectionError):
    """The Dask scheduler named by ``compute.dask_address`` did not answer."""


def runs_in_process(spec: ComputeSpec, workers: int) -> bool:
    """Whether the work runs in this process: a local pool of one (no pool at all)."""
    return spec.scheduler == "local" and workers <= 1


@contextlib.contextmanager
def case_executor(
    spec: ComputeSpec,
    *,
    workers: int,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[Executor]:
    """An executor for independent per-case tasks, closed (after its tasks) on leaving; when the
    block raises, the tasks not yet run are cancelled.

    Args:
        spec: the ``compute`` params: ``local`` (a pool of ``workers`` processes) or ``dask``
            (the scheduler at ``spec.dask_address``; ``workers`` does not apply, the cluster's
            workers set the parallelism).
        workers: local processes.
        initializer, initargs: run once in every worker process before its tasks (the pool's
            initializer; on Dask, on every worker connected now, with ``Client.run``).

    Raises:
        SchedulerUnavailableError: no Dask scheduler answered at ``spec.dask_address`` within
            ``spec.dask_connect_timeout_s``.
    """
    if spec.scheduler == "local":
        with ProcessPoolExecutor(max_workers=max(1, workers), initializer=initializer, initargs=initargs) as pool:
            try:
                yield pool
            except BaseException:  # a failed case: the cases not started yet are not run
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return
    from distributed import Client

    try:
        client = Client(spec.dask_address, timeout=spec.dask_connect_timeout_s, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise SchedulerUnavailableError(
            f"compute.dask_address {spec.dask_address}: no Dask scheduler answered within "
            f"{spec.dask_connect_timeout_s:g} s ({type(exc).__name__}: {exc}); start one (`dask scheduler`, then "
            "`dask worker ADDRESS` on each machine) or set compute.scheduler: local") from exc
    with client:
        n_workers = len(client.scheduler_info().get("workers", {}))
        log.info("Dask scheduler %s: %d worker(s)", spec.dask_address, n_workers)
        if initializer is not None:
            client.run(initializer, *initargs)
        executor = client.get_executor(pure=False)
        try:
            yield executor
        except BaseException:  # a failed case: the others are cancelled
            executor.shutdown(wait=False)
            raise
        executor.shutdown(wait=True)

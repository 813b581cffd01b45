"""The case pool on Ray: one actor per worker, each owning its backend instance.

Each actor runs one case at a time (as the local pool does), so a worker that dies costs
exactly its case: that case becomes a CRASH record, a fresh actor takes its place and the run
goes on.  A case over ``timeout`` becomes TIMEOUT and its actor is killed and replaced.
Records are yielded as they finish (``ray.wait``), so they stream into the results file.
Ctrl-C (or closing the generator) cancels the outstanding work and kills the actors; a Ray
instance this run started is shut down again.

GPU workers: backends that run on a CUDA device ask Ray for ``num_gpus=1`` each when the
cluster has GPUs, so Ray places one worker per GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

#: backends whose kernels run on a CUDA device when one is present
GPU_BACKENDS = ("cupy", "triton", "torch")
POLL_S = 0.5
#: how long an actor may take to start (process, imports, backend) before its first case's
#: clock starts; a start that takes longer is that case's TIMEOUT (as in the local pool)
STARTUP_S = 120.0


def _import_ray():
    try:
        import ray
    except ImportError:
        from opbench.errors import UsageError

        raise UsageError("--executor ray needs Ray: pip install 'opbench[ray]'") from None
    return ray


def connect(ray, address: str | None, jobs: int) -> bool:
    """Join ``address`` or start a local instance with ``jobs`` CPUs; True if we started it."""
    if ray.is_initialized():
        return False
    try:
        if address is None:
            ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # no cluster there, a client package missing: one line, no trace
        from opbench.errors import UsageError

        where = "a new local instance" if address is None else address
        raise UsageError(f"--executor ray: cannot start or join Ray at {where}: "
                         f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from None
    return True


def gpus_per_worker(ray, backend_name: str) -> int:
    wants_gpu = backend_name in GPU_BACKENDS
    return 1 if wants_gpu and ray.cluster_resources().get("GPU", 0) >= 1 else 0


class WorkActor:
    """A Ray actor body: starts one ``pool.Work`` (e.g. a backend instance) and runs items on
    it one by one."""

    def __init__(self, work) -> None:
        self.work = work
        work.start()

    def run(self, item) -> dict:
        return self.work.run(item)


def run_in_ray(address: str | None, work, items: list, jobs: int,
               timeout: float | None) -> Iterator[dict]:
    ray = _import_ray()
    started = connect(ray, address, jobs)
    gpus = gpus_per_worker(ray, getattr(work, "backend_name", ""))
    actor_cls = ray.remote(num_cpus=1, num_gpus=gpus)(WorkActor)
    pool = _ActorPool(ray, lambda: actor_cls.remote(work), max(1, min(jobs, len(items))))
    try:
        yield from pool.run(items, work, timeout)
    finally:
        pool.cancel()
        if started:
            ray.shutdown()


class _ActorPool:
    def __init__(self, ray, make_actor, size: int) -> None:
        self.ray, self.make_actor = ray, make_actor
        self.actors: list = []
        self.ready: list = []  # per actor: the ref that resolves once it is constructed
        self.ready_at: dict[int, float] = {}
        for index in range(size):
            self.actors.append(None)
            self.ready.append(None)
            self.replace(index)
        self.running: dict = {}  # object ref -> (actor index, case, time submitted)

    def replace(self, index: int) -> None:
        self.actors[index] = self.make_actor()
        self.ready[index] = self.actors[index].__ray_ready__.remote()
        self.ready_at.pop(index, None)

    def _begun(self, index: int, now: float) -> float | None:
        """When actor ``index`` was first seen constructed; None while it is still starting:
        a case's clock starts then, not while Ray starts the process and the backend."""
        if index not in self.ready_at:
            done, _ = self.ray.wait([self.ready[index]], timeout=0)
            if not done:
                return None
            self.ready_at[index] = now
        return self.ready_at[index]

    def submit(self, index: int, case) -> None:
        ref = self.actors[index].run.remote(case)
        self.running[ref] = (index, case, time.monotonic())

    def run(self, items: list, work, timeout: float | None) -> Iterator[dict]:
        queue = list(reversed(items))
        for index in range(len(self.actors)):
            if queue:
                self.submit(index, queue.pop())
        while self.running:
            done, _ = self.ray.wait(list(self.running), num_returns=1, timeout=POLL_S)
            finished = [(ref, self._result(ref, work)) for ref in done]
            finished += self._expired(work, timeout)
            for ref, record in finished:
                index, _case, _start = self.running.pop(ref)
                yield record
                if queue:
                    self.submit(index, queue.pop())

    def _result(self, ref, work) -> dict:
        index, item, _ = self.running[ref]
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            self.replace(index)  # the worker died: replace it, go on
            return work.lost(item, "CRASH", f"Ray worker died ({type(exc).__name__})")
        except self.ray.exceptions.RayTaskError as exc:
            return work.lost(item, "ERROR", str(exc.cause or exc))

    def _expired(self, work, timeout: float | None) -> list:
        if not timeout:
            return []
        now, lost = time.monotonic(), []
        for ref, (index, case, submitted) in self.running.items():
            begun = self._begun(index, now)
            late = (now - submitted > timeout + STARTUP_S if begun is None
                    else now - max(submitted, begun) > timeout)
            if late:
                self.ray.kill(self.actors[index])
                self.replace(index)
                lost.append((ref, work.lost(case, "TIMEOUT", f"no result after {timeout:g} s")))
        return lost

    def cancel(self) -> None:
        """Ctrl-C or an early stop: cancel what is still running, kill every actor."""
        for ref in list(self.running):
            try:
                self.ray.cancel(ref)  # actor tasks: cancel without force; the kill below ends it
            except Exception:  # noqa: BLE001 - already finished or gone: nothing to cancel
                pass
        for actor in self.actors:
            self.ray.kill(actor)
        self.running.clear()

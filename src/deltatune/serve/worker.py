"""The thread that owns the model: it runs batches, and changes adapters only between them.

Requests (from the web server's event loop) and adapter loads/unloads (from the endpoints) are
handed over under one lock; the thread alone calls the model, so no adapter is added or removed
while a batch computes. An unload takes the name away at once and removes the adapter only when no
admitted request still uses it. A failure inside a batch fails the requests it concerns and the
loop goes on; only ``stop`` ends it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from ..adapters import delete_adapter
from ..io import load
from .errors import ServeError, bad_request, internal, unavailable
from .events import Failed, Sink
from .registry import Adapter, AdapterTable
from .rows import HeldRoute

log = logging.getLogger("deltatune.serve")


class Job(Protocol):
    """What the worker needs of any request: its adapter, a sink, and whether the client went away."""

    adapter: str | None
    cancelled: bool

    @property
    def sink(self) -> Sink: ...


@dataclass
class Unload:
    entry: Adapter
    done: Future[None]


def adapter_folder(path: str) -> Path:
    """The adapter folder ``path`` names: a folder holding an adapter, or a run folder (its ``adapter/``)."""
    folder = Path(path).expanduser()
    if (folder / "run.json").is_file():
        folder = folder / "adapter"
    if not folder.is_dir():
        raise bad_request(f"no adapter folder at {path!r} (on the server's machine): give the folder that "
                          "dt.save or `deltatune train` wrote", "adapter_not_found", "lora_path")
    return folder


class Worker:
    """The model-owning thread: subclasses say what one step of work is (``step``) and which jobs they hold."""

    name = "worker"

    def __init__(self, model: nn.Module, table: AdapterTable) -> None:
        self.model, self.table = model, table
        self.lock = threading.Condition()
        self.waiting: deque[Any] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._unloads: list[Unload] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.device = next(model.parameters()).device
        self.route = HeldRoute(model)  # the adapters of the rows a step computes, kept between steps

    # -- subclasses ------------------------------------------------------------------------------

    def step(self) -> None:
        """One unit of work (a batch, a decode step); called whenever ``busy`` says there is some."""
        raise NotImplementedError

    def running(self) -> Iterable[Job]:
        """Admitted jobs not in ``waiting``."""
        return ()

    def check_adapter(self, internal: str) -> None:
        """Raise if the just-loaded adapter ``internal`` cannot run in this worker's batches."""

    def release(self) -> None:
        """Undo what the steps keep in force on the model between them (the held route): called before
        adapters change, and when the worker goes idle or stops."""
        self.route.release()

    def abandon(self, error: BaseException) -> None:
        """Fail every running job and forget them: a step broke outside the per-request handling."""

    # -- the thread ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"deltatune-serve-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop after the current step; every request still waiting or running gets a 503."""
        with self.lock:
            self._stopping = True
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        gone = unavailable("the server is shutting down; send the request again once it is back")
        with self.lock:
            for job in [*self.waiting, *self.running()]:
                job.sink(Failed(gone))
            self.waiting.clear()
            for _, future in self._calls:
                future.set_exception(gone)
            for unload in self._unloads:
                unload.done.set_exception(gone)

    def _busy(self) -> bool:
        """Under the lock: is there anything to do now?"""
        return bool(self.waiting or self._calls or any(True for _ in self.running()) or self._unloadable())

    def _loop(self) -> None:
        try:
            while self._wait_for_work():
                with self.lock:
                    calls = list(self._calls)
                    self._calls.clear()
                if calls:
                    self.release()  # a call may change adapters: no route may be open across it
                for call, future in calls:
                    self._run_call(call, future)
                self._finish_unloads()
                self._step()
        finally:
            self.release()

    def _wait_for_work(self) -> bool:
        """Block until there is work (True) or the worker stops (False); idle, nothing stays in force."""
        with self.lock:
            if self._stopping or self._busy():
                return not self._stopping
        self.release()
        with self.lock:
            while not (self._stopping or self._busy()):
                self.lock.wait()
            return not self._stopping

    def _step(self) -> None:
        try:
            self.step()
        except Exception as error:  # a bug outside the per-request handling: its requests fail, serving goes on
            log.exception("serving step failed")
            self.release()
            self.abandon(error)

    @staticmethod
    def _run_call(call: Callable[[], Any], future: Future[Any]) -> None:
        try:
            future.set_result(call())
        except BaseException as error:  # the caller gets it; the loop goes on
            future.set_exception(error)

    # -- requests --------------------------------------------------------------------------------

    def submit(self, served: str, jobs: list[Any]) -> None:
        """Queue ``jobs`` for the adapter the client calls ``served``; 404 if no such model is served.
        Resolving and queueing under one lock: an unload cannot slip in between."""
        with self.lock:
            if self._stopping:
                raise unavailable("the server is shutting down")
            internal_name = self.table.resolve(served)
            for job in jobs:
                job.adapter = internal_name
            self.waiting.extend(jobs)
            self.lock.notify_all()

    def take_waiting(self, limit: int, admit: Callable[[Any], bool] = lambda job: True) -> list[Any]:
        """Up to ``limit`` waiting jobs, oldest first, that ``admit`` accepts; cancelled ones are dropped."""
        taken: list[Any] = []
        with self.lock:
            kept: deque[Any] = deque()
            while self.waiting:
                job = self.waiting.popleft()
                if job.cancelled:
                    continue
                if len(taken) < limit and admit(job):
                    taken.append(job)
                else:
                    kept.append(job)
            self.waiting = kept
        return taken

    @staticmethod
    def fail(job: Job, error: BaseException, what: str = "the batch") -> None:
        if not isinstance(error, ServeError):
            log.error("a request failed in %s", what, exc_info=error)
            error = internal(what, error)
        job.sink(Failed(error))

    # -- adapters --------------------------------------------------------------------------------

    def call(self, work: Callable[[], Any]) -> Future[Any]:
        """Run ``work`` on the worker thread between two steps; its result (or error) in the future."""
        future: Future[Any] = Future()
        with self.lock:
            if self._stopping:
                raise unavailable("the server is shutting down")
            self._calls.append((work, future))
            self.lock.notify_all()
        return future

    def load_adapter(self, served: str, path: str) -> Future[Any]:
        """Load the adapter folder ``path`` as ``served`` (between steps); the future ends when it is usable."""
        folder = adapter_folder(path)
        with self.lock:
            entry = self.table.reserve(served, str(folder))
        try:
            return self.call(lambda: self._load(entry, folder))
        except ServeError:
            with self.lock:
                self.table.drop(served)
            raise

    def load_now(self, served: str, path: str) -> None:
        """``load_adapter`` before the thread starts (the command line's ``--adapter``)."""
        folder = adapter_folder(path)
        self._load(self.table.reserve(served, str(folder)), folder)

    def _load(self, entry: Adapter, folder: Path) -> None:
        try:
            load(self.model, folder, name=entry.internal)
        except Exception as error:
            with self.lock:
                self.table.drop(entry.served)
            raise bad_request(f"cannot load {folder} as {entry.served!r}: {error}", "adapter_load_failed",
                              "lora_path") from error
        try:
            self.check_adapter(entry.internal)
        except Exception as error:
            delete_adapter(self.model, entry.internal)
            with self.lock:
                self.table.drop(entry.served)
            raise bad_request(f"{folder} loaded but cannot be served: {error}", "adapter_not_servable",
                              "lora_path") from error
        with self.lock:
            entry.state = "ready"
        log.info("adapter %r loaded from %s", entry.served, folder)

    def unload_adapter(self, served: str) -> Future[None]:
        """Take ``served`` away from new requests now; the future ends once it is off the model."""
        done: Future[None] = Future()
        with self.lock:
            if self._stopping:
                raise unavailable("the server is shutting down")
            self._unloads.append(Unload(self.table.start_unload(served), done))
            self.lock.notify_all()
        return done

    def _in_use(self) -> set[str | None]:
        return {job.adapter for job in [*self.waiting, *self.running()] if not job.cancelled}

    def _unloadable(self) -> list[Unload]:
        used = self._in_use()
        return [u for u in self._unloads if u.entry.internal not in used]

    def _finish_unloads(self) -> None:
        with self.lock:
            ready = self._unloadable()
            for unload in ready:
                self._unloads.remove(unload)
        if ready:
            self.release()
        for unload in ready:
            try:
                delete_adapter(self.model, unload.entry.internal)
            except Exception as error:
                unload.done.set_exception(internal("unloading the adapter", error))
                continue
            finally:
                with self.lock:
                    self.table.drop(unload.entry.served)
            unload.done.set_result(None)
            log.info("adapter %r unloaded", unload.entry.served)

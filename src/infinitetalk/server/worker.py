"""Workers: one per GPU (one on the CPU), each with its own JobService kept between jobs.

A worker claims a queued job (preferring the model settings it has loaded), runs it with
`resume=True` on the job's output path, so a job re-queued after its worker died continues from
its last finished window, and reports progress to the store. A heartbeat thread renews the lease
and polls for cancel requests; a worker that lost its lease (another worker took the job) stops.
"""
from __future__ import annotations

import logging
import os
import socket
import secrets
import threading
import time
from typing import Optional

from .. import progress as ev
from ..errors import InfiniteTalkError, JobCancelledError
from ..progress import CancelToken
from .config import ServerConfig
from .store import JobRecord, JobStore

log = logging.getLogger(__name__)

INTERNAL_ERROR = "The job failed with an internal error ({name}); the server log has the details."


def worker_id(device: str) -> str:
    """host:pid:device:random; host and pid let a restarted server re-queue its dead jobs at once."""
    return f"{socket.gethostname()}:{os.getpid()}:{device}:{secrets.token_hex(3)}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_local(store: JobStore) -> list[str]:
    """Re-queue running jobs of this host whose worker process is gone (a server restarted after a crash)."""
    out = []
    for job in store.running_on(socket.gethostname()):
        try:
            pid = int((job.worker or "").split(":")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not pid_alive(pid) and store.requeue(job.id, job.worker, "requeued"):
            log.warning("re-queued job %s: its worker %s is gone", job.id, job.worker)
            out.append(job.id)
    return out


def job_spec(record: JobRecord, config: ServerConfig, device: str):
    """The JobSpec a worker runs: stored paths under the job folder, this worker's device, resume on."""
    from ..service import JobSpec

    data = record.spec_dict
    folder = config.jobs_dir / record.id
    for name in ("image", "video", "audio", "audio2"):
        if data.get(name) and not os.path.isabs(data[name]):
            data[name] = str(folder / data[name])
    data["output"] = str(folder / "output.mp4")
    data["resume"] = True
    runtime = dict(data.get("runtime") or {})
    runtime.update(device=device, weights=config.weights)
    data["runtime"] = runtime
    return JobSpec.from_dict(data)


class Reporter:
    """Progress events -> store updates (step updates at most every `every` seconds) and metrics."""

    def __init__(self, store: JobStore, job_id: str, worker: str, metrics, every: float = 0.25):
        self.store, self.job_id, self.worker, self.metrics, self.every = store, job_id, worker, metrics, every
        self._last = 0.0

    def _put(self, **values) -> None:
        try:
            self.store.progress(self.job_id, self.worker, **values)
        except Exception:  # noqa: BLE001 - progress is best effort; the heartbeat notices a dead store
            log.exception("progress update of %s failed", self.job_id)

    def __call__(self, event) -> None:
        times = {"eta_s": event.eta_s, "elapsed_s": event.elapsed_s}
        if isinstance(event, ev.JobStarted):
            self._put(window_count=event.windows, steps=event.steps, first_window=event.first_window,
                      windows_done=event.first_window, frames=event.frames, duration_s=event.duration_s, **times)
        elif isinstance(event, ev.StageStarted):
            self._put(stage=event.stage, **times)
        elif isinstance(event, ev.WindowStarted):
            self._put(stage="sample", window_index=event.index, window_count=event.count, step=0, **times)
        elif isinstance(event, ev.StepFinished):
            now = time.monotonic()
            if now - self._last >= self.every or event.step == event.steps:
                self._last = now
                self._put(step=event.step, steps=event.steps, **times)
        elif isinstance(event, ev.WindowFinished):
            self.metrics.window_seconds.observe(event.seconds)
            self._put(windows_done=event.index + 1, **times)
            self.store.mark_first_window(self.job_id, self.worker)


class Worker:
    """One device, one JobService, one thread."""

    def __init__(self, store: JobStore, config: ServerConfig, device: str, metrics, wake: threading.Condition):
        from ..service import JobService

        self.store, self.config, self.device, self.metrics, self.wake = store, config, device, metrics, wake
        self.id = worker_id(device)
        self.service = JobService()
        self.loaded_key: Optional[str] = None
        self.current: Optional[str] = None
        self._stop = threading.Event()
        self._token: Optional[CancelToken] = None
        self._last_reap = 0.0
        self.thread = threading.Thread(target=self._loop, name=f"infinitetalk-worker-{device}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after giving the current job back to the queue (its finished windows are kept)."""
        self._stop.set()
        if self._token is not None:
            self._token.cancel()
        with self.wake:
            self.wake.notify_all()
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    # ---- loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._maybe_reap()
                job = self.store.claim(self.id, self.loaded_key, self.config.model_wait)
            except Exception:  # noqa: BLE001 - a store outage must not end the worker
                log.exception("worker %s: claiming a job failed; retrying", self.id)
                self._stop.wait(2.0)
                continue
            if job is None:
                with self.wake:
                    self.wake.wait(0.5)
                continue
            self._run(job)

    def _maybe_reap(self) -> None:
        now = time.monotonic()
        if now - self._last_reap >= max(0.5, self.config.heartbeat_timeout / 3):
            self._last_reap = now
            requeued, failed = self.store.reap(self.config.heartbeat_timeout, self.config.max_attempts)
            for job_id in requeued:
                log.warning("re-queued job %s: its worker stopped sending heartbeats", job_id)
            for job_id in failed:
                self.metrics.jobs_finished.labels(state="failed").inc()

    def _heartbeat(self, job_id: str, token: CancelToken, done: threading.Event, status: dict) -> None:
        every = min(1.0, max(0.1, self.config.heartbeat_timeout / 4))
        while not done.wait(every):
            try:
                answer = self.store.heartbeat(job_id, self.id)
            except Exception:  # noqa: BLE001 - keep trying; the lease may expire meanwhile
                log.exception("heartbeat of %s failed", job_id)
                continue
            if answer is None:
                log.warning("worker %s lost job %s (another worker took it); stopping it here", self.id, job_id)
                status["lost"] = True
                token.cancel()
            elif answer:
                token.cancel()

    def _loaded_after(self, job: JobRecord, model) -> Optional[str]:
        """The model key of what the service holds after `job`, whatever its outcome: the job's
        own once its pipeline is loaded (also when it then failed or was cancelled), nothing when
        a load failed and dropped the old pipeline, else the key of the pipeline kept from before."""
        loaded = self.service.loaded()
        if model is not None and model in loaded:
            return job.model_key
        return self.loaded_key if loaded else None

    def _run(self, job: JobRecord) -> None:
        token = CancelToken()
        self._token, self.current = token, job.id
        done, status = threading.Event(), {"lost": False}
        beat = threading.Thread(target=self._heartbeat, args=(job.id, token, done, status), daemon=True,
                                name=f"infinitetalk-heartbeat-{job.id}")
        beat.start()
        loads = self.service.loads
        outcome = "failed"
        model = None  # the job's model settings, once checked
        try:
            spec = job_spec(job, self.config, self.device)
            log.info("worker %s runs job %s (attempt %d)", self.id, job.id, job.attempts)
            prepared = self.service.check(spec)
            model = prepared.model
            result = self.service.run(spec, progress=Reporter(self.store, job.id, self.id, self.metrics),
                                      cancel=token, prepared=prepared)
            outcome = "succeeded"
            self.store.finish(job.id, self.id, "succeeded", frames=result.frames, duration_s=result.duration_s)
        except JobCancelledError as err:
            if status["lost"]:
                outcome = "lost"
            elif self._stop.is_set():
                outcome = "requeued"
                self.store.requeue(job.id, self.id, "requeued")
            else:
                outcome = "cancelled"
                self.store.finish(job.id, self.id, "cancelled", str(err), type(err).__name__)
        except InfiniteTalkError as err:
            self.store.finish(job.id, self.id, "failed", str(err), type(err).__name__)
        except Exception as err:  # noqa: BLE001 - an internal bug: logged with its traceback, sentence for the user
            log.exception("job %s failed with an internal error", job.id)
            self.store.finish(job.id, self.id, "failed", INTERNAL_ERROR.format(name=type(err).__name__),
                              "InternalError")
        finally:
            done.set()
            beat.join(5.0)
            self._token, self.current = None, None
            self.loaded_key = self._loaded_after(job, model)
            if self.service.loads > loads:
                self.metrics.model_loads.inc(self.service.loads - loads)
            if outcome in ("succeeded", "failed", "cancelled"):
                self.metrics.jobs_finished.labels(state=outcome).inc()


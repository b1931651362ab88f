"""Many jobs with the models loaded once: check everything, group by model settings, run, report.

    jobs = read_jobs("jobs.csv", defaults=JobSpec(output="", runtime=RuntimeOptions(model="tiny")))
    service = JobService()
    plan = plan_batch(jobs, service)           # every job checked, nothing loaded
    report = run_batch(plan, service, observer)  # one JobService: a pipeline per model setting

`plan_batch` runs `JobService.check` on every job before any model loads, so a bad line is
reported (with its place) at once; a job whose output is already there (and has no unfinished
`OUTPUT.job/`) is kept, not redone, unless `overwrite`. Jobs run grouped by their
`ModelSettings` in order of first appearance, so the pipeline is built once per distinct
setting. Every job runs with `resume=True` (unless `overwrite`): an interrupted batch, run
again, continues each unfinished job where it stopped. A job that fails is reported and the
batch goes on; a cancel (the token, Ctrl-C) stops it with the finished windows kept.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import InfiniteTalkError, JobCancelledError, ResumeError
from ..generation.job_state import JobDir
from ..progress import CancelToken, ProgressEvent, StageFinished, StepFinished, WindowFinished
from .batch_files import BatchJob, BatchProblem, JobList
from .job import JobSpec
from .runner import JobService, ModelSettings

log = logging.getLogger(__name__)

DONE, FAILED, BAD, KEPT, CANCELLED, NOT_RUN = "done", "failed", "bad", "kept", "cancelled", "not run"


@dataclass(frozen=True)
class PlannedJob:
    """A checked job: its spec (resume set), model settings and size of work."""

    job: BatchJob
    spec: JobSpec
    model: ModelSettings
    windows: int
    steps: int
    frames: int

    @property
    def work(self) -> int:
        """Sampler steps of the whole job (the unit of the batch ETA)."""
        return max(1, self.windows * self.steps)


@dataclass(frozen=True)
class JobOutcome:
    name: str
    where: str
    status: str  # done | failed | bad | kept | cancelled | not run
    seconds: float = 0.0
    output: str = ""
    message: str = ""


@dataclass
class BatchPlan:
    source: Path
    jobs: list[PlannedJob] = field(default_factory=list)  # in run order (grouped by model settings)
    kept: list[JobOutcome] = field(default_factory=list)
    problems: list[BatchProblem] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # the places of the lines, in the list's order

    @property
    def groups(self) -> int:
        return len({p.model for p in self.jobs})


@dataclass
class BatchReport:
    outcomes: list[JobOutcome]
    loads: int  # pipelines built during the batch
    seconds: float
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(o.status in (DONE, KEPT) for o in self.outcomes)


@dataclass(frozen=True)
class BatchStatus:
    """Where the batch stands: jobs done / failed / left and the ETA of the whole batch."""

    total: int
    done: int
    failed: int
    left: int
    elapsed_s: float
    eta_s: Optional[float]


class BatchObserver:
    """What a display gets (all optional): the plan, each job's start, its progress events, its end."""

    def planned(self, plan: BatchPlan) -> None:
        pass

    def job_started(self, index: int, planned: PlannedJob, status: BatchStatus) -> None:
        pass

    def job_event(self, planned: PlannedJob, event: ProgressEvent, status: BatchStatus) -> None:
        pass

    def job_finished(self, outcome: JobOutcome, status: BatchStatus) -> None:
        pass


# ---- planning --------------------------------------------------------------------------------


def plan_batch(jobs: JobList, service: JobService, overwrite: bool = False,
               checked: Optional[Callable[[int, int], None]] = None) -> BatchPlan:
    """Check every job (no model loads) and order them by model settings; see the module doc.
    `checked(i, n)` is called after each check (for a display)."""
    plan = BatchPlan(jobs.source, problems=list(jobs.problems), order=list(jobs.order))
    planned: list[PlannedJob] = []
    for i, job in enumerate(jobs.jobs):
        output = Path(job.spec.output)
        if not overwrite and output.is_file() and not JobDir(output).exists():
            plan.kept.append(JobOutcome(job.name, job.where, KEPT, output=str(output),
                                        message="the output is already there (--overwrite makes it again)"))
        else:
            spec = job.spec.with_(resume=not overwrite, restart=overwrite)
            try:
                prepared = service.check(spec)
            except ResumeError as err:
                plan.problems.append(BatchProblem(job.where, f"{err} (in a batch, --overwrite starts it over)", job.name))
            except InfiniteTalkError as err:
                plan.problems.append(BatchProblem(job.where, str(err), job.name))
            else:
                planned.append(PlannedJob(job, spec, prepared.model, len(prepared.plan), prepared.config.sample_steps,
                                          prepared.plan.total_frames))
        if checked is not None:
            checked(i + 1, len(jobs.jobs))
    order: dict[ModelSettings, int] = {}
    for p in planned:
        order.setdefault(p.model, len(order))
    plan.jobs = sorted(planned, key=lambda p: order[p.model])  # stable: file order within a group
    return plan


# ---- running ---------------------------------------------------------------------------------


class BatchEta:
    """Remaining seconds of the batch: the current job's own ETA, then the jobs left at the rate
    (seconds per sampler step, loads excluded) measured so far, plus a load per model change."""

    def __init__(self, plan: BatchPlan):
        self.plan = plan
        self._done_work = 0
        self._done_seconds = 0.0
        self._loads: list[float] = []
        self._current: Optional[PlannedJob] = None
        self._current_index = 0
        self._current_load = 0.0
        self._current_eta: Optional[float] = None
        self._current_elapsed = 0.0

    def start(self, index: int, planned: PlannedJob) -> None:
        self._current, self._current_index = planned, index
        self._current_load, self._current_eta, self._current_elapsed = 0.0, None, 0.0

    def event(self, event: ProgressEvent) -> None:
        if isinstance(event, StageFinished) and event.stage == "load":
            self._current_load = event.seconds
            self._loads.append(event.seconds)
        if isinstance(event, (StepFinished, WindowFinished)):
            self._current_eta, self._current_elapsed = event.eta_s, event.elapsed_s

    def finish(self, planned: PlannedJob, seconds: float, ok: bool) -> None:
        if ok:
            self._done_work += planned.work
            self._done_seconds += max(0.0, seconds - self._current_load)
        self._current = None

    def eta(self) -> Optional[float]:
        rate = None
        if self._done_work:
            rate = self._done_seconds / self._done_work
        elif self._current is not None and self._current_eta is not None:
            rate = (self._current_elapsed - self._current_load + self._current_eta) / self._current.work
        if rate is None:
            return None
        later = self.plan.jobs[self._current_index + 1:] if self._current is not None else \
            self.plan.jobs[self._current_index:]
        seconds = (self._current_eta or 0.0) if self._current is not None else 0.0
        seconds += rate * sum(p.work for p in later)
        seen = {self._current.model} if self._current is not None else set()
        changes = len({p.model for p in later} - seen)  # jobs run grouped: one load per new setting
        if self._loads:
            seconds += changes * sum(self._loads) / len(self._loads)
        return seconds


def run_batch(plan: BatchPlan, service: JobService, observer: Optional[BatchObserver] = None,
              cancel: Optional[CancelToken] = None) -> BatchReport:
    """Run the planned jobs one after the other with `service`; see the module doc."""
    observer = observer or BatchObserver()
    observer.planned(plan)
    t0 = time.monotonic()
    loads0 = service.loads
    outcomes = [JobOutcome(p.name, p.where, BAD, message=p.message) for p in plan.problems] + list(plan.kept)
    eta = BatchEta(plan)
    total = len(plan.jobs)
    counts = {"done": 0, "failed": 0}

    def status() -> BatchStatus:
        finished = counts["done"] + counts["failed"]
        return BatchStatus(total, counts["done"], counts["failed"], total - finished, time.monotonic() - t0, eta.eta())

    interrupted = False
    for index, planned in enumerate(plan.jobs):
        job = planned.job
        if interrupted:
            outcomes.append(JobOutcome(job.name, job.where, NOT_RUN, output=planned.spec.output))
            continue
        eta.start(index, planned)
        observer.job_started(index, planned, status())
        Path(planned.spec.output).parent.mkdir(parents=True, exist_ok=True)

        def on_event(event: ProgressEvent, planned=planned) -> None:
            eta.event(event)
            observer.job_event(planned, event, status())

        started = time.monotonic()
        try:
            result = service.run(planned.spec, progress=on_event, cancel=cancel)
        except (JobCancelledError, KeyboardInterrupt) as err:
            interrupted = True
            message = str(err) or "interrupted; run the same batch again to continue (finished windows are kept)"
            outcome = JobOutcome(job.name, job.where, CANCELLED, time.monotonic() - started, planned.spec.output, message)
        except InfiniteTalkError as err:
            outcome = JobOutcome(job.name, job.where, FAILED, time.monotonic() - started, "", str(err))
        except Exception as err:  # noqa: BLE001 - an internal bug in one job must not stop the others
            log.debug("job %s failed", job.name, exc_info=True)
            outcome = JobOutcome(job.name, job.where, FAILED, time.monotonic() - started, "",
                                 f"internal error: {type(err).__name__}: {err} (run with -v for the traceback)")
        else:
            outcome = JobOutcome(job.name, job.where, DONE, result.seconds, str(result.output))
        if outcome.status == DONE:
            counts["done"] += 1
        elif outcome.status == FAILED:
            counts["failed"] += 1
        eta.finish(planned, outcome.seconds, outcome.status == DONE)
        outcomes.append(outcome)
        observer.job_finished(outcome, status())
    rank = {where: i for i, where in enumerate(plan.order)}
    outcomes.sort(key=lambda o: rank.get(o.where, len(rank)))  # the list's order, whatever the run order
    return BatchReport(outcomes, service.loads - loads0, time.monotonic() - t0, interrupted)

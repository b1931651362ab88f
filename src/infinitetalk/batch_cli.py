"""`infinitetalk batch JOBS`: many jobs from a folder or a list, the models loaded once.

The options are those of `generate` (as the defaults of every job; a job's own fields win) plus
--output-dir, --check and --overwrite. The display is rich on a terminal (the batch bar with
jobs done / left and ETA, the current job's step bar) and one line per job otherwise; a summary
table ends it. Exit code 0 when every job is done (or kept), 2 when any failed or could not run,
130 when interrupted (run the same command again to continue).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, TextIO

BATCH_EXAMPLES = """\
JOBS is one of:
  a folder      each image or video with the audio file of the same name (anna.png + anna.wav;
                anna.txt, if there, is the prompt); the videos go to JOBS/outputs/
  jobs.csv      a header row of field names, one job per row, e.g.
                  name,image,audio,prompt,seed
                  anna,anna.png,anna.wav,A woman talks in a studio.,7
                columns: image, video, audio, audio2, audio_type, bbox1, bbox2, prompt, text, voice,
                seed, steps, preset, size, frame_num, max_seconds, ... (any generate option, dashes or
                underscores), model, device, variant, dit, vae, lora, name, output
  jobs.jsonl    one JSON object per line with the same fields
  jobs.json     the official input JSON (prompt, cond_video, cond_audio, bbox) as a list of jobs

examples:
  infinitetalk batch lectures/ --preset fast
  infinitetalk batch examples/jobs.csv --model tiny --steps 1 --output-dir out/
  infinitetalk batch jobs.csv --check          # check every line, load nothing

Every job is checked before any model loads; jobs run grouped by model settings (one load per
setting). Run the same command again after an interruption: finished outputs are kept and
unfinished jobs continue where they stopped (--overwrite makes everything again).
"""

SKIP = {"help", "output", "resume", "restart", "quiet"}  # generate options the batch decides itself


def add_batch_parser(sub, generate: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `batch` subcommand; `generate` is the generate parser whose options become the defaults."""
    p = sub.add_parser("batch", help="make many videos from a folder or a job list (models loaded once)",
                       description="Make many videos with the models loaded once: a folder of images/videos and "
                                   "audio files of the same name, a jobs.csv / jobs.jsonl, or the official input "
                                   "JSON as a list.",
                       epilog=BATCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", metavar="JOBS", help="a folder, a .csv, a .jsonl or a .json file of jobs")
    own = p.add_argument_group("batch")
    own.add_argument("--output-dir", metavar="DIR", default=None,
                     help="where the videos go (default: outputs/ in the folder, or beside the list file)")
    own.add_argument("--check", action="store_true", help="check every job and stop (loads no model)")
    own.add_argument("--overwrite", action="store_true",
                     help="make every job again: replace finished outputs, start unfinished jobs over")
    own.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="set_fields",
                     help="a job field as the default of every job, also one without an option "
                          "(e.g. --set frame_num=21 --set motion_frame=5); repeatable")
    own.add_argument("--quiet", "-q", action="store_true", help="print only problems and the summary table")
    # argparse has no public way to share options between subcommands: the generate parser's own
    # actions are added to this parser's groups (what `parents=` does, minus the options above).
    for group in generate._action_groups:  # noqa: SLF001
        actions = [a for a in group._group_actions if a.dest not in SKIP]  # noqa: SLF001
        if actions:
            target = p.add_argument_group(f"defaults for every job: {group.title}")
            for action in actions:
                target._add_action(action)  # noqa: SLF001
    p.set_defaults(func=cmd_batch)
    return p


def _defaults(args: argparse.Namespace):
    """The generate options (and --set fields) as a JobSpec: the start of every job."""
    from pathlib import Path

    from .cli import job_spec
    from .errors import InfiniteTalkError, InputError
    from .service.batch_files import apply_fields

    ns = argparse.Namespace(**vars(args))
    ns.output, ns.resume, ns.restart = "", False, False
    spec = job_spec(ns)
    for item in args.set_fields:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item}: write FIELD=VALUE, e.g. --set frame_num=21.")
        try:
            spec = apply_fields(spec, {key: value}, Path.cwd())
        except InfiniteTalkError as err:
            raise InputError(f"--set {item}: {err}") from None
    if spec.image and spec.video:
        raise InputError("Give either --image or --video as the default of the jobs, not both.")
    return spec


def cmd_batch(args: argparse.Namespace) -> int:
    from .service import JobService
    from .service.batch import plan_batch, run_batch
    from .service.batch_files import read_jobs

    defaults = _defaults(args)
    jobs = read_jobs(args.jobs, defaults, args.output_dir)
    display = BatchDisplay(sys.stderr, quiet=args.quiet)
    service = JobService()
    plan = plan_batch(jobs, service, overwrite=args.overwrite, checked=display.checked)
    display.plan_checked(plan)
    if args.check:
        return 2 if plan.problems else 0
    report = run_batch(plan, service, display)
    display.summary(report)
    if report.interrupted:
        return 130
    return 0 if report.ok else 2


def finished_windows(planned) -> int:
    """Windows a job continues from: the saved state of its unfinished OUTPUT.job/ (0 for a new job)."""
    from pathlib import Path

    from .errors import InfiniteTalkError
    from .generation.job_state import JobDir

    if not planned.spec.resume:
        return 0
    try:
        state = JobDir(Path(planned.spec.output)).load_state()
    except InfiniteTalkError:
        return 0
    return state.next_window if state is not None else 0


def clock(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class BatchDisplay:
    """The batch on stderr: rich bars on a terminal, one line per job otherwise (BatchObserver)."""

    def __init__(self, stream: TextIO = sys.stderr, quiet: bool = False, tty: Optional[bool] = None):
        from rich.console import Console

        self.stream, self.quiet = stream, quiet
        self.tty = bool(getattr(stream, "isatty", lambda: False)()) if tty is None else tty
        self.console = Console(file=stream, width=None if self.tty else 160, highlight=False,
                               force_terminal=self.tty, no_color=not self.tty)
        self._progress = None
        self._batch_task = self._job_task = None
        self._total = 0
        self._noticed = False

    # ---- plan ----------------------------------------------------------------------------
    def checked(self, done: int, total: int) -> None:
        if self.tty and not self.quiet:
            self.stream.write(f"\rchecking the jobs: {done}/{total}")
            if done == total:
                self.stream.write("\n")
            self.stream.flush()

    def plan_checked(self, plan) -> None:
        for problem in plan.problems:
            self.console.print(f"[bold red]bad[/]: {problem.where}: {problem.message}", markup=True, soft_wrap=True)
        if self.quiet:
            return
        groups = plan.groups
        self.console.print(f"{len(plan.jobs)} job(s) to make, {len(plan.kept)} already made, "
                           f"{len(plan.problems)} bad; {groups} model setting(s) to load", soft_wrap=True)

    def planned(self, plan) -> None:
        self._total = len(plan.jobs)
        if self.tty and not self.quiet and plan.jobs:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=self.console)
            self._batch_task = self._progress.add_task("jobs", total=len(plan.jobs), info="ETA --:--")
            self._progress.start()

    # ---- jobs ----------------------------------------------------------------------------
    def job_started(self, index: int, planned, status) -> None:
        if self.quiet:
            return
        head = f"[{index + 1}/{self._total}] {planned.job.name}"
        done = finished_windows(planned)
        if not done:
            verb = "started"
        elif done < planned.windows:
            verb = f"resuming at window {done + 1}/{planned.windows}"
        else:
            verb = f"resuming: all {planned.windows} windows are made, the video is assembled"
        if self._progress is not None:
            if self._job_task is not None:
                self._progress.remove_task(self._job_task)
            self._job_task = self._progress.add_task(head, total=planned.work, completed=done * planned.steps,
                                                     info="" if not done else verb)
        else:
            self.console.print(f"{head}: {verb} ({planned.windows} window(s) of {planned.steps} steps, "
                               f"{planned.frames} frames; {planned.job.where})", soft_wrap=True)

    def job_event(self, planned, event, status) -> None:
        from .progress import Notice, StageStarted, StepFinished

        if self.quiet:
            return
        if self._progress is not None:
            if isinstance(event, StepFinished):
                self._progress.update(self._job_task, completed=event.window * event.steps + event.step,
                                      info=f"ETA {clock(event.eta_s)}")
                self._progress.update(self._batch_task, info=self._status_text(status))
            elif isinstance(event, StageStarted) and event.message:
                self._progress.update(self._job_task, info=event.message)
        elif isinstance(event, StageStarted) and event.stage == "load":
            self.console.print(f"  {event.message} ...", soft_wrap=True)
        if isinstance(event, Notice) and event.level != "info" and not self._noticed:
            self._noticed = True  # the same warning (e.g. the tiny model's) would repeat for every job
            self.console.print(f"note: {event.message}", soft_wrap=True)

    def job_finished(self, outcome, status) -> None:
        line = self._outcome_line(outcome)
        if self._progress is not None:
            self._progress.update(self._batch_task, advance=1, info=self._status_text(status))
            self._progress.console.print(line, soft_wrap=True)
        elif not self.quiet or outcome.status != "done":
            self.console.print(f"{line}  | {self._status_text(status)}", soft_wrap=True)

    def _outcome_line(self, outcome) -> str:
        if outcome.status == "done":
            return f"done: {outcome.name} in {outcome.seconds:.1f} s -> {outcome.output}"
        return f"{outcome.status.upper()}: {outcome.name}: {outcome.message}"

    @staticmethod
    def _status_text(status) -> str:
        return (f"{status.done} done, {status.failed} failed, {status.left} left, "
                f"elapsed {clock(status.elapsed_s)}, ETA {clock(status.eta_s if status.left else 0.0)}")

    # ---- end -----------------------------------------------------------------------------
    def summary(self, report) -> None:
        from rich import box
        from rich.table import Table

        if self._progress is not None:
            self._progress.stop()
        table = Table(box=box.SIMPLE_HEAD)
        for name in ("job", "status", "seconds", "output"):
            table.add_column(name, overflow="fold")
        for o in report.outcomes:
            seconds = f"{o.seconds:.1f}" if o.seconds else ""
            shown = o.output if o.status in ("done", "kept") or not o.message else f"{o.where}: {o.message}"
            table.add_row(o.name or o.where, o.status, seconds, shown)
        self.console.print(table)
        bad = sum(o.status not in ("done", "kept") for o in report.outcomes)
        self.console.print(f"models loaded: {report.loads}; {len(report.outcomes)} job(s) in "
                           f"{clock(report.seconds)}", soft_wrap=True)
        if report.interrupted:
            self.console.print("interrupted: run the same command again to continue (finished windows are kept).")
        elif bad:
            self.console.print(f"error: {bad} of {len(report.outcomes)} job(s) failed or could not run; see the table "
                               "above.", soft_wrap=True)

"""The job service: one description of a job, one `run` entry for the CLI, the UI, the API and batch.

    from infinitetalk.service import JobService, JobSpec, RuntimeOptions
    spec = JobSpec(output="talk.mp4", image="face.png", audio="speech.wav", preset="fast",
                   runtime=RuntimeOptions(model="tiny"))
    JobService().run(spec, progress=print)
"""
from .job import SETTING_FIELDS, JobSpec, RuntimeOptions
from .runner import JobResult, JobService, ModelSettings, PreparedJob, resume_key, run

__all__ = ["JobResult", "JobService", "JobSpec", "ModelSettings", "PreparedJob", "RuntimeOptions", "SETTING_FIELDS",
           "resume_key", "run"]

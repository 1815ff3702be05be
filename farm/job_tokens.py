"""Job-scoped worker tokens: what a worker shows the API to download one job's inputs and upload its artifacts.

A token is an HMAC-signed (Django `signing`, secret FARM_JOB_TOKEN_SECRET) claim "job J, attempt A", minted when an
attempt is published. It is accepted only while that attempt is the job's live one (queued or running), and only by
the endpoints that serve that job's own inputs, adapter and artifacts (`api/worker_io.py`): a leaked token expires
with the attempt, and never opens another job's data. Workers hold no database or storage credentials.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.core import signing

from farm.errors import FarmError, Unauthenticated
from farm.models import Job, JobStatus
from settings import env

_SALT = "farm.job-token"
PREFIX = "fjt-"
# Signature age limit: a backstop; the attempt check below is what retires a token.
MAX_AGE_S = 7 * 24 * 3600


class Forbidden(FarmError):
    status = 403
    type = "permission_error"
    code = "token_scope"


@dataclass(frozen=True)
class JobGrant:
    job: Job
    attempt: int


def job_token_mint(*, job_id: str, attempt: int) -> str:
    """A token for one attempt of one job."""
    return PREFIX + signing.dumps(
        {"j": str(job_id), "a": int(attempt)}, key=env.FARM_JOB_TOKEN_SECRET, salt=_SALT, compress=False
    )


def job_token_verify(*, token: str, job_id: str | None = None) -> JobGrant:
    """The job and attempt a token grants; 401 for a bad or expired token, 403 when it is for another job or an
    attempt that is no longer the job's live one."""
    if not token.startswith(PREFIX):
        raise Unauthenticated("A job token is required.", code="invalid_job_token")
    try:
        claim = signing.loads(token[len(PREFIX) :], key=env.FARM_JOB_TOKEN_SECRET, salt=_SALT, max_age=MAX_AGE_S)
    except signing.SignatureExpired:
        raise Unauthenticated("The job token has expired.", code="invalid_job_token") from None
    except signing.BadSignature:
        raise Unauthenticated("The job token is not valid.", code="invalid_job_token") from None
    if job_id is not None and str(job_id) != claim["j"]:
        raise Forbidden("This token is for another job.")
    job = Job.objects.select_related("model").filter(pk=claim["j"]).first()
    if job is None or job.attempt != claim["a"] or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise Forbidden("This token's job attempt is no longer running.", code="token_expired_attempt")
    return JobGrant(job=job, attempt=claim["a"])

"""Batch jobs: every sample of a data set predicted through an API's queue.

A job is a record in Redis (:mod:`~inferq.jobs.records`), so it outlives whoever submitted
it::

    queued -> running -> succeeded | completed with failures | failed | stopped
       ^                                                          |        |
       +---------------- resume (a failed or stopped job) --------+--------+

Nobody's terminal drives it: every scaler runs a :class:`~inferq.jobs.runner.JobRunner`,
which claims a job that wants a driver, with a lease it renews, and starts its driver
(``python -m inferq.jobs.driver``, :mod:`~inferq.jobs.driver`). A driver that dies (SIGKILL, a
host lost) stops renewing; its lease lapses and a scaler starts another, which goes on from
the job's checkpoint. A job whose input or output is a local path is driven only on the
machine it was submitted from. Inputs and outputs, local or on S3, are read and written as
streams (:mod:`~inferq.jobs.files`).

A job's chunks travel as batch messages through the API's queue and are answered by its
replicas like any other message; the chunk's message and its answer are part of the wire
format (:mod:`inferq.messages`), so a replica needs nothing of this package.

==========================  =============================================================
:class:`Jobs`               the records: submit, list, stop, resume, and the driver's steps
:class:`Job`                the handle ``Client.batch`` returns: status, wait, stop, resume
:class:`JobRunner`          what a scaler needs: drivers for the jobs that want one
==========================  =============================================================
"""

from inferq.jobs.job import Job
from inferq.jobs.records import JobRecord, Jobs, JobStatus, this_machine
from inferq.jobs.runner import JobRunner

__all__ = ["Job", "JobRecord", "JobRunner", "JobStatus", "Jobs", "this_machine"]

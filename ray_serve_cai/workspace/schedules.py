"""Job schedules, as CML fires them: a job with a cron `schedule` gets a run at each time it names.

CML's job spec carries `schedule` (a five-field cron expression, e.g. `0 13 * * 1`) and `timezone`
(an IANA name; empty means UTC). Here a task of the server's event loop looks once a second: a job
whose next time has come gets a run, as `POST …/runs` would start it, unless it is paused, its
project is not ready, or its previous run is still active (CML keeps one active run per job: that
time is skipped). Times missed while the workspace was down are not made up; a changed schedule
counts from the moment of the change. Cron arithmetic is croniter's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from ray_serve_cai.errors import BadInput
from ray_serve_cai.workspace.errors import WorkspaceAPIError

if TYPE_CHECKING:
    from ray_serve_cai.workspace.model import Job
    from ray_serve_cai.workspace.service import WorkspaceService

logger = logging.getLogger("ray_serve_cai.workspace.schedules")

TICK_SECONDS = 1.0


class ScheduleError(BadInput):
    """A schedule or timezone that cannot be used."""


def zone_of(name: str) -> tzinfo:
    if not name.strip():
        return timezone.utc
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown timezone {name!r}") from None


def next_time(schedule: str, zone_name: str, after: float) -> float:
    """The first time (epoch seconds) after `after` that `schedule` names in `zone_name`."""
    zone = zone_of(zone_name)
    if len(schedule.split()) != 5 or not croniter.is_valid(schedule):
        raise ScheduleError(f"schedule {schedule!r} is not a five-field cron expression")
    start = datetime.fromtimestamp(after, tz=zone)
    return float(croniter(schedule, start).get_next(float))


@dataclass
class _Entry:
    schedule: str
    zone: str
    at: float | None  # None: the schedule is unusable (logged once)


class Scheduler:
    """The next time of every scheduled job; `tick(now)` starts the runs that are due."""

    def __init__(self, service: WorkspaceService, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.clock = clock
        self._entries: dict[str, _Entry] = {}

    def _entry(self, job: Job, now: float) -> _Entry:
        entry = self._entries.get(job.id)
        if entry is None or (entry.schedule, entry.zone) != (job.schedule, job.timezone):
            try:
                at: float | None = next_time(job.schedule, job.timezone, now)
            except ScheduleError as err:
                logger.warning("job %s (%s): %s; it will not fire", job.id, job.name, err)
                at = None
            entry = self._entries[job.id] = _Entry(job.schedule, job.timezone, at)
        return entry

    def tick(self, now: float | None = None) -> list[str]:
        """Start the due runs; returns the ids of the jobs that got one."""
        now = self.clock() if now is None else now
        fired: list[str] = []
        scheduled = {j.id: j for j in self.service.jobs.values() if j.schedule.strip()}
        for job_id in set(self._entries) - set(scheduled):
            del self._entries[job_id]
        for job in scheduled.values():
            entry = self._entry(job, now)
            if entry.at is None or now < entry.at:
                continue
            entry.at = next_time(job.schedule, job.timezone, now)
            if job.paused:
                continue
            try:
                run = self.service.create_run(job.project_id, job.id, {})
            except WorkspaceAPIError as err:
                logger.info("job %s (%s): scheduled run skipped: %s", job.id, job.name, err)
                continue
            logger.info("job %s (%s): scheduled run %s started (%s)", job.id, job.name, run.id, job.schedule)
            fired.append(job.id)
        if fired:
            self.service.flush()
        return fired

    async def run_forever(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # one bad pass must not end the schedules
                logger.exception("job schedules: a pass failed")
            await asyncio.sleep(TICK_SECONDS)


def start_schedules(service: WorkspaceService) -> asyncio.Task[None]:
    """The scheduler as a task of the running loop (the server's startup); cancel it at shutdown."""
    return asyncio.ensure_future(Scheduler(service).run_forever())


__all__ = ["ScheduleError", "Scheduler", "next_time", "start_schedules"]

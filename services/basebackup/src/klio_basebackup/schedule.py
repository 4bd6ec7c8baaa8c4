"""When a cluster's backups run: on request or on its cron schedule, one at a time, never twice."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from croniter import croniter

from klio_basebackup.backup import BackupJob, ClusterContext
from klio_common import fsio
from klio_common.catalog.backups import new_backup_id
from klio_common.errors import ConfigError

log = logging.getLogger("klio.basebackup")

# A lease from another host is stale once its backup has shown no sign of life for this long
# (a running backup rewrites progress.json every second, even while it waits for WAL).
STALE_AFTER = 15 * 60.0
_RECHECK = 60.0  # the schedule re-reads the clock at least this often (suspend, clock steps)


def check_schedule(cluster: str, expression: str | None) -> None:
    """Refuse a cron expression croniter cannot evaluate.

    Raises:
        ConfigError: naming the cluster's ``backup_schedule``.
    """
    if expression is not None and not croniter.is_valid(expression):
        raise ConfigError(
            [f"clusters[{cluster}].backup_schedule: invalid cron expression {expression!r}"]
        )


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # zombies are dead


class ClusterRunner:
    """Runs the backups of one cluster: at most one at a time.

    Args:
        ctx: the cluster.
    """

    def __init__(self, ctx: ClusterContext) -> None:
        self.ctx = ctx
        self.job: BackupJob | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.finished

    # -- starting -------------------------------------------------------------------------------

    def start(self, request_ids: list[str | None]) -> BackupJob:
        """Start a backup now for ``request_ids`` (the caller checked that none runs)."""
        self.reconcile()
        when = datetime.now(UTC)  # ids end in Z: they are UTC whatever the host's zone
        backup_id = new_backup_id(when)
        # Ids have one-second resolution: never reuse a directory, committed or not.
        while self.ctx.catalog.backup_dir(backup_id).exists():
            when += timedelta(seconds=1)
            backup_id = new_backup_id(when)
        self.ctx.catalog.begin(backup_id, request_id=request_ids[0])
        job = BackupJob(self.ctx, backup_id, request_ids)
        self.job = job
        self._task = asyncio.create_task(self._run(job), name=f"backup:{self.ctx.name}:{job.id}")
        return job

    async def _run(self, job: BackupJob) -> None:
        await job.run()
        waiting = [r for r in job.request_ids[1:] if r is not None]
        if job.start_lsn is None and waiting and not self._stopping:
            log.info(
                "cluster %s: backup %s failed before it started; a new one serves %d request(s)",
                self.ctx.name,
                job.id,
                len(waiting),
            )
            self.start(list(waiting))

    def request(self, request_id: str) -> None:
        """Handle ``backup.requested``: start a backup, or answer with the one running."""
        job = self.job
        if job is None or job.finished:
            self.start([request_id])
        else:
            job.serve(request_id)

    def scheduled(self) -> None:
        """The cron schedule fired."""
        if self.running:
            assert self.job is not None
            log.info(
                "cluster %s: scheduled backup skipped, backup %s still runs",
                self.ctx.name,
                self.job.id,
            )
            return
        self.start([None])

    async def run_schedule(self, stop: asyncio.Event) -> None:
        """Start a backup at each time of the cluster's ``backup_schedule`` until ``stop``."""
        expression = self.ctx.cluster.backup_schedule
        if expression is None:
            return
        times = croniter(expression, datetime.now().astimezone())
        due: datetime = times.get_next(datetime)
        log.info("cluster %s: next scheduled backup at %s", self.ctx.name, due.isoformat())
        while not stop.is_set():
            wait = (due - datetime.now().astimezone()).total_seconds()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(wait, _RECHECK))
                continue
            self.scheduled()
            due = times.get_next(datetime)
            while due <= datetime.now().astimezone():  # slept through some: run once, not each
                due = times.get_next(datetime)

    async def shutdown(self) -> None:
        """Stop a running backup (it aborts and announces ``backup.failed``).

        A backup that is committing is let finish: cancelling could only tear its commit.
        """
        self._stopping = True
        task = self._task
        if task is None or task.done():
            return
        if self.job is None or not self.job.committing:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # -- reconciling ----------------------------------------------------------------------------

    def reconcile(self) -> list[str]:
        """Remove backups that crashed before committing; announce each as failed.

        A lease is stale when its process is gone from this host (or is this very process, whose
        own backup is not running: a container restart reuses pids), or, for a lease of another
        host, when its backup has not written progress for `STALE_AFTER` seconds. Directories
        with neither a manifest nor a readable lease are a crash's leftovers too.

        Returns:
            The ids removed.
        """
        catalog = self.ctx.catalog
        host, me = socket.gethostname(), os.getpid()
        current = self.job.id if self.running and self.job is not None else None
        removed = []
        leases = {lease.id: lease for lease in catalog.leases()}
        for lease in leases.values():
            if lease.id == current:
                continue
            if lease.host == host:
                stale = lease.pid == me or not _pid_alive(lease.pid)
                why = f"pid {lease.pid} on {host} is gone"
            else:
                idle = time.time() - _last_activity(catalog.backup_dir(lease.id))
                stale = idle > STALE_AFTER
                why = f"{lease.host} has not written progress for {idle:.0f} s"
            if stale:
                catalog.abort(lease.id)
                removed.append(lease.id)
                self.ctx.announce_failed(
                    lease.id,
                    f"klio-basebackup stopped before backup {lease.id} finished ({why})",
                    request_id=lease.request_id,
                )
        if catalog.dir.is_dir():
            for entry in os.scandir(catalog.dir):
                name = entry.name
                if name in leases or name == current or fsio.is_temp_name(name):
                    continue
                if entry.is_dir() and not (Path(entry.path) / "manifest").exists():
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(name)
        for backup_id in removed:
            log.warning("cluster %s: removed unfinished backup %s", self.ctx.name, backup_id)
        return removed


def _last_activity(directory: Path) -> float:
    latest = 0.0
    for name in ("lease.json", "progress.json"):
        with contextlib.suppress(OSError):
            latest = max(latest, (directory / name).stat().st_mtime)
    return latest

"""One base backup: BASE_BACKUP streamed into the chunk store, its WAL awaited, then committed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from klio_basebackup import stream
from klio_basebackup.chunker import Chunker, manifest_member
from klio_basebackup.state import BackupMetrics, Progress
from klio_basebackup.walwait import check_identity, wait_for_wal, wal_range
from klio_common.catalog.backups import BackupCatalog, BackupManifest, TablespaceEntry
from klio_common.catalog.chunks import ChunkStore
from klio_common.catalog.wal import WalArchive
from klio_common.compression import Codec
from klio_common.crypto import KeyRing
from klio_common.errors import KlioError, Retryable
from klio_common.events import BackupDone, BackupFailed, BackupStarted, now
from klio_common.events.base import SYSTEM_ID_UNKNOWN
from klio_common.events.codec import event_id_for
from klio_common.pg.lsn import Lsn
from klio_common.pg.server import check_server_version, parse_size
from klio_common.replication import ReplicationConnection
from klio_common.runtime.outbox import Outbox
from klio_common.runtime.settings import BackupSettings, ClusterSettings

log = logging.getLogger("klio.basebackup")
APPLICATION_NAME = "klio-basebackup"
PROGRESS_EVERY = 1.0
WAL_QUICK_POLL = 0.05  # seconds between looks for the backup's WAL, during the first ...
WAL_QUICK_FOR = 3.0  # ... seconds of the wait (then walwait's own pace)


@dataclass
class ClusterContext:
    """Everything a backup of one cluster needs, and how it announces what it did."""

    cluster: ClusterSettings
    backup: BackupSettings
    archive: WalArchive
    catalog: BackupCatalog
    store: ChunkStore
    outbox: Outbox
    wake: Callable[[], None]
    keyring: KeyRing
    codec: Codec
    metrics: BackupMetrics
    file_mode: int = 0o640
    dir_mode: int = 0o750

    @property
    def name(self) -> str:
        return self.cluster.name

    def system_id(self) -> str:
        """The system identifier the archive recorded ('0' before the first WAL)."""
        ident = self.archive.read_identity()
        return ident.system_id if ident is not None else SYSTEM_ID_UNKNOWN

    def announce_started(
        self, backup_id: str, request_id: str | None, tli: int, start: int, system_id: str
    ) -> None:
        """Answer a request (or a schedule) with the backup that serves it."""
        self.outbox.put(
            BackupStarted(
                event_id=event_id_for(self.name, "backup.started", backup_id, request_id or ""),
                occurred_at=now(),
                cluster=self.name,
                system_id=system_id,
                backup_id=backup_id,
                request_id=request_id,
                timeline=tli,
                start_lsn=str(Lsn(start)),
            )
        )
        self.wake()

    def announce_failed(
        self,
        backup_id: str,
        reason: str,
        system_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        """Say that a backup failed and left nothing visible (once per request it answers)."""
        self.outbox.put(
            BackupFailed(
                event_id=event_id_for(self.name, "backup.failed", backup_id, request_id or ""),
                occurred_at=now(),
                cluster=self.name,
                system_id=system_id or self.system_id(),
                backup_id=backup_id,
                reason=reason,
                request_id=request_id,
            )
        )
        self.wake()

    def announce_done(self, m: BackupManifest) -> None:
        """Say that a backup is committed and its WAL archived."""
        self.outbox.put(
            BackupDone(
                event_id=event_id_for(self.name, "backup.done", m.id),
                occurred_at=now(),
                cluster=self.name,
                system_id=m.system_id,
                backup_id=m.id,
                timeline=m.timeline,
                start_lsn=m.start_lsn,
                end_lsn=m.end_lsn,
                start_time=m.start_time,
                end_time=m.end_time,
                size=m.size,
                stored_size=m.stored_size,
                new_chunk_bytes=m.new_chunk_bytes,
                chunks_total=m.chunks_total,
                chunks_new=m.chunks_new,
            )
        )
        self.wake()


class _Sink:
    """Routes the stream to the chunker, the manifest buffer and the progress record."""

    def __init__(self, job: BackupJob, chunker: Chunker, progress: Progress) -> None:
        self.job = job
        self.chunker = chunker
        self.progress_ = progress
        self.manifest_bytes = bytearray()
        self.member = chunker.member
        self.data = chunker.data
        self.member_end = chunker.member_end
        self.pace = chunker.pace

    def started(self, positions: stream.BackupPositions) -> None:
        self.progress_.estimated(positions.estimated)
        self.progress_.phase = "streaming"
        self.job.started(positions.start_tli, positions.start_lsn)

    def manifest(self, piece: memoryview) -> None:
        self.manifest_bytes += piece

    def progress(self, received: int) -> None:
        self.progress_.received(received)


class BackupJob:
    """One backup of one cluster, from its lease to its commit (or its abort).

    Args:
        ctx: the cluster.
        backup_id: the id; `BackupCatalog.begin` has written its lease.
        request_ids: the requests it answers (``[None]`` when scheduled).
    """

    def __init__(self, ctx: ClusterContext, backup_id: str, request_ids: list[str | None]) -> None:
        self.ctx = ctx
        self.id = backup_id
        self.request_ids = list(request_ids)
        self.timeline: int | None = None
        self.start_lsn: int | None = None
        self.system_id = ctx.system_id()
        self.committing = False  # past the point where stopping could only tear the commit
        self.finished = False
        self.timings: dict[str, float] = {}  # seconds per phase: stream, wal_wait, commit
        self._chunker: Chunker | None = None

    def started(self, tli: int, start: int) -> None:
        """BASE_BACKUP returned its start position: answer every request it serves so far."""
        self.timeline, self.start_lsn = tli, start
        for request_id in self.request_ids:
            self.ctx.announce_started(self.id, request_id, tli, start, self.system_id)
        log.info("cluster %s: backup %s started at %s", self.ctx.name, self.id, Lsn(start))

    def serve(self, request_id: str) -> None:
        """Answer another request with this backup (at once if it has started, else when it does).

        A backup that fails before it starts hands its waiting requests to a new backup (see
        `ClusterRunner`), so every request is answered.
        """
        if request_id in self.request_ids:
            return  # a redelivery: answered already, or will be when the backup starts
        self.request_ids.append(request_id)
        if self.timeline is not None and self.start_lsn is not None:
            self.ctx.announce_started(
                self.id, request_id, self.timeline, self.start_lsn, self.system_id
            )

    async def run(self) -> BackupManifest | None:
        """Take the backup; on any failure abort it, announce ``backup.failed`` and return None."""
        progress = Progress(
            self.ctx.catalog.backup_dir(self.id) / "progress.json",
            self.id,
            self.ctx.name,
            self.ctx.metrics,
            file_mode=self.ctx.file_mode,
            dir_mode=self.ctx.dir_mode,
        )
        writer = asyncio.create_task(_progress_loop(progress), name=f"progress:{self.id}")
        try:
            manifest = await self._take(progress, writer)
        except asyncio.CancelledError:
            self._fail("the basebackup service stopped during the backup")
            raise
        except Exception as exc:
            await self._discard_chunks()
            self._fail(
                exc.message if isinstance(exc, KlioError) else f"{type(exc).__name__}: {exc}"
            )
            if not isinstance(exc, KlioError):
                log.error("backup %s failed unexpectedly", self.id, exc_info=exc)
            return None
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            progress.finished()
            self.finished = True
        return manifest

    async def _discard_chunks(self) -> None:
        """Free at once what the failed backup stored (often the very space it lacked)."""
        chunker = self._chunker
        if chunker is None:
            return
        try:
            known = await asyncio.to_thread(self.ctx.catalog.known_chunks)
            freed = await asyncio.to_thread(chunker.discard, known)
        except OSError as exc:  # left for retention, which removes unreferenced chunks
            log.warning("backup %s: cannot remove its chunks: %s", self.id, exc)
            return
        log.info("backup %s: removed the chunks it stored (%d bytes)", self.id, freed)

    def _fail(self, reason: str) -> None:
        try:
            self.ctx.catalog.abort(self.id)
        except OSError as exc:  # pragma: no cover - the stale lease is removed on next start
            log.warning("cannot remove backup %s: %s", self.id, exc)
        log.error(
            "cluster %s: backup %s failed: %s",
            self.ctx.name,
            self.id,
            reason,
            extra={"cluster": self.ctx.name, "backup_id": self.id},
        )
        for request_id in self.request_ids:
            self.ctx.announce_failed(self.id, reason, self.system_id, request_id)

    async def _take(self, progress: Progress, writer: asyncio.Task[None]) -> BackupManifest:
        ctx, settings = self.ctx, self.ctx.backup
        begun, t0 = datetime.now(UTC), time.monotonic()
        conn = await ReplicationConnection.connect(
            ctx.cluster.conninfo,
            application_name=APPLICATION_NAME,
            password=ctx.cluster.password(),
        )
        chunker: Chunker | None = None
        try:
            pg_version = check_server_version(conn.server_version)
            system_id = (await conn.command("IDENTIFY_SYSTEM"))[0][0] or SYSTEM_ID_UNKNOWN
            self.system_id = system_id
            seg_size = parse_size((await conn.command("SHOW wal_segment_size"))[0][0] or "")
            check_identity(ctx.archive, system_id, self.id)
            known = await asyncio.to_thread(ctx.catalog.known_chunks)
            chunker = self._chunker = Chunker(ctx.store, known, settings.chunk_size, settings.jobs)
            sink = _Sink(self, chunker, progress)
            sql = stream.command(f"klio {self.id}", settings.checkpoint)
            pos = await stream.run(conn, sql, sink)
            conn.close()
            ended = datetime.now(UTC)
            chunker.add_file(manifest_member(len(sink.manifest_bytes)), bytes(sink.manifest_bytes))
            files = await chunker.finish()
        finally:
            conn.close()
            if chunker is not None:
                await chunker.close()
        if pos.end_tli != pos.start_tli:
            raise Retryable(
                f"the timeline changed from {pos.start_tli} to {pos.end_tli} "
                f"during backup {self.id}",
                hint="a failover happened during the backup; take a new one",
            )
        segments = wal_range(pos.start_tli, pos.start_lsn, pos.end_lsn, seg_size)
        progress.phase = "waiting for WAL"
        t1 = time.monotonic()
        self.timings["stream"] = t1 - t0

        def seen(n: int) -> None:
            progress.wal_missing = n

        # The last segment usually lands a few ms after BASE_BACKUP ends: look again often at
        # first rather than once a second, which added up to a second to every backup.
        wake = asyncio.Event()
        ticker = asyncio.create_task(_tick(wake, WAL_QUICK_POLL, WAL_QUICK_FOR))
        try:
            await wait_for_wal(
                ctx.archive,
                segments,
                backup_id=self.id,
                timeout=settings.wal_timeout,
                wake=wake,
                on_poll=seen,
            )
        finally:
            ticker.cancel()
        progress.phase = "committing"
        t2 = time.monotonic()
        self.timings["wal_wait"] = t2 - t1
        await asyncio.to_thread(ctx.store.sync)
        figures = chunker.figures
        manifest = BackupManifest(
            id=self.id,
            cluster=ctx.name,
            system_id=system_id,
            pg_version=pg_version,
            timeline=pos.start_tli,
            start_lsn=str(Lsn(pos.start_lsn)),
            end_lsn=str(Lsn(pos.end_lsn)),
            start_time=begun,
            end_time=ended,
            label=f"klio {self.id}",
            chunk_size=settings.chunk_size,
            compression=ctx.codec.name,
            key_id=ctx.keyring.active,
            size=figures.size,
            stored_size=figures.stored_size,
            new_chunk_bytes=figures.new_chunk_bytes,
            chunks_total=figures.chunks_total,
            chunks_new=figures.chunks_new,
            wal_start_segment=segments[0].name,
            wal_end_segment=segments[-1].name,
            tablespaces=[
                TablespaceEntry(oid=t.oid, location=t.location, size=t.size)
                for t in pos.tablespaces
            ],
            files=files,
        )
        self.committing = True  # the runner lets a stop wait for the commit instead
        writer.cancel()  # progress.json must not reappear in a committed backup's directory
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await asyncio.to_thread(ctx.catalog.commit, manifest)
        ctx.announce_done(manifest)
        duration = time.monotonic() - t0
        self.timings["commit"] = time.monotonic() - t2
        ctx.metrics.last_success.labels(ctx.name).set(time.time())
        ctx.metrics.duration.labels(ctx.name).set(duration)
        ctx.metrics.chunks_new.labels(ctx.name).set(figures.chunks_new)
        log.info(
            "cluster %s: backup %s done in %.1f s: %d bytes, %d new chunks (%d bytes stored)",
            ctx.name,
            self.id,
            duration,
            figures.size,
            figures.chunks_new,
            figures.new_chunk_bytes,
            extra={"cluster": ctx.name, "backup_id": self.id},
        )
        return manifest


async def _tick(event: asyncio.Event, every: float, duration: float) -> None:
    """Set ``event`` every ``every`` seconds for ``duration`` seconds."""
    for _ in range(round(duration / every)):
        await asyncio.sleep(every)
        event.set()


async def _progress_loop(progress: Progress) -> None:
    while True:
        await asyncio.to_thread(progress.write)
        await asyncio.sleep(PROGRESS_EVERY)

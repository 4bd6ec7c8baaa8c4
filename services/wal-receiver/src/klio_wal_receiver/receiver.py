"""One cluster's replication stream: start point, streaming, timeline switches, gaps, feedback."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from klio_common import fsio
from klio_common.catalog.wal import WalArchive
from klio_common.errors import KlioError, Permanent, Retryable
from klio_common.partial import read_partial
from klio_common.pg.lsn import Lsn
from klio_common.pg.server import check_server_version, check_wal_level, parse_size
from klio_common.pg.timeline import TimelineHistory
from klio_common.pg.walname import WalSegment
from klio_common.replication import (
    Keepalive,
    ReplicationConnection,
    ServerError,
    StreamEnded,
    XLogData,
)
from klio_common.runtime.settings import ClusterSettings
from klio_wal_receiver.announcer import Announcer, ClosedSegment
from klio_wal_receiver.pump import SyncPump
from klio_wal_receiver.segments import SegmentWriter
from klio_wal_receiver.state import ReceiverState

log = logging.getLogger("klio.wal_receiver")

_FORKED = re.compile(r"forked from timeline (\d+) at ([0-9A-F]+/[0-9A-F]+)", re.IGNORECASE)
_BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


class ClusterReceiver:
    """Keeps the WAL archive of one cluster complete, reconnecting with backoff.

    Args:
        cluster: the cluster's settings.
        archive: its Tier-1 WAL archive.
        make_writer: builds the SegmentWriter once the segment size is known.
        announcer: makes events durable (outbox) and wakes the publisher.
        state: the shared status (metrics, /readyz, status.json).
        password: the replication role's password, from ``password_file``.
    """

    def __init__(
        self,
        cluster: ClusterSettings,
        archive: WalArchive,
        make_writer: Callable[[int], SegmentWriter],
        announcer: Announcer,
        state: ReceiverState,
        password: str | None,
    ) -> None:
        self.cluster = cluster
        self.archive = archive
        self.make_writer = make_writer
        self.announcer = announcer
        self.state = state
        self.password = password
        self.writer: SegmentWriter | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"klio-pump-{cluster.name}")

    async def run(self, stop: asyncio.Event) -> None:
        """Stream until ``stop``; every failure is logged and retried with backoff."""
        attempt = 0
        while not stop.is_set():
            try:
                await self._session(stop)
                attempt = 0
            except (KlioError, OSError) as exc:
                permanent = isinstance(exc, Permanent)
                self.state.failed(str(exc))
                log.error(
                    "cluster %s: %s",
                    self.cluster.name,
                    exc,
                    extra={"cluster": self.cluster.name, "permanent": permanent},
                )
                attempt += 1
            except Exception as exc:  # a bug must not end archiving: log it whole and retry
                self.state.failed(f"unexpected error: {exc!r}")
                log.exception("cluster %s: unexpected error", self.cluster.name)
                attempt += 1
            finally:
                await self._release()
            if stop.is_set():
                break
            delay = _BACKOFF[min(attempt, len(_BACKOFF) - 1)] if attempt else 0.2
            self.state.reconnects.inc()
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
        self.state.stopped()
        self._thread.shutdown(wait=True)

    async def _release(self) -> None:
        if self.writer is not None:
            try:
                await self.writer.flush()
            except KlioError as exc:  # the error that ended the session, said again
                log.warning("cluster %s: final flush: %s", self.cluster.name, exc)
            except Exception:
                log.exception("cluster %s: final flush failed", self.cluster.name)
            self.writer.close()
            self.writer = None

    async def _session(self, stop: asyncio.Event) -> None:
        self.state.connecting()
        conn = await ReplicationConnection.connect(
            self.cluster.conninfo,
            application_name=self.cluster.application_name or self.cluster.slot,
            password=self.password,
        )
        try:
            await self._stream(conn, stop)
        finally:
            conn.close()

    async def _prepare(self, conn: ReplicationConnection) -> tuple[int, int, int]:
        check_server_version(conn.server_version)
        check_wal_level((await conn.command("SHOW wal_level"))[0][0] or "")
        seg_size = parse_size((await conn.command("SHOW wal_segment_size"))[0][0] or "")
        row = (await conn.command("IDENTIFY_SYSTEM"))[0]
        system_id, server_tli, xlogpos = row[0] or "", int(row[1] or 1), Lsn.parse(row[2] or "0/0")
        self.archive.ensure_identity(system_id, seg_size, conn.server_version, int(time.time()))
        self.announcer.system_id = system_id
        self.state.server_lsn = int(xlogpos)
        self.state.server_timeline = server_tli
        return seg_size, server_tli, int(xlogpos)

    async def _slot(self, conn: ReplicationConnection) -> tuple[int, int | None]:
        slot = self.cluster.slot
        rows = await conn.command(f"READ_REPLICATION_SLOT {slot}")
        if not rows or rows[0][1] is None:
            log.info("cluster %s: creating replication slot %s", self.cluster.name, slot)
            try:
                await conn.command(f"CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL")
            except ServerError as exc:
                if exc.sqlstate != "42710":  # duplicate_object: created concurrently
                    raise
            rows = await conn.command(f"READ_REPLICATION_SLOT {slot}")
        kind, restart, tli = rows[0][0], rows[0][1], rows[0][2]
        if kind not in (None, "physical"):
            raise Permanent(
                f"replication slot {slot} is a {kind} slot",
                hint="give Klio its own physical slot (clusters[].slot)",
            )
        return int(Lsn.parse(restart or "0/0")), int(tli) if tli else None

    async def _archive_histories(self, conn: ReplicationConnection, server_tli: int) -> None:
        if server_tli <= 1:
            return
        have = set(self.archive.list_history())
        history = await self._fetch_history(conn, server_tli)
        for tli in [*history.ancestors(), server_tli]:
            if tli > 1 and tli not in have:
                await self._fetch_history(conn, tli)

    async def _fetch_history(self, conn: ReplicationConnection, tli: int) -> TimelineHistory:
        rows = await conn.command(f"TIMELINE_HISTORY {tli}")
        content = (rows[0][1] or "").encode()
        self.announcer.history(tli, content)
        return TimelineHistory.parse(tli, content.decode())

    def _archive_position(self, seg_size: int) -> tuple[int, int] | None:
        """(timeline, LSN) where the archive ends, or None when it is empty."""
        assert self.writer is not None
        opened = (
            [p for p in self.archive.open_dir.glob("*.partial")]
            if (self.archive.open_dir.is_dir())
            else []
        )
        segs = self.archive.list_segments(seg_size)
        found: tuple[int, int] | None = None
        for path in sorted(opened, reverse=True):
            seg = WalSegment.parse(path.name.removesuffix(".partial"), seg_size)
            if self.archive.segment_path(seg.name).exists():
                path.unlink()  # a crash after closing the segment, before removing its partial
            elif found is None:
                found = seg.timeline, seg.start_lsn
            elif not recover(self.writer, path, seg):
                log.error(
                    "cluster %s: %s is incomplete and older than the open segment; it is kept "
                    "for inspection and the archive may have a gap there",
                    self.cluster.name,
                    path,
                )
        if found is None and segs:
            last = segs[-1]
            return last.timeline, last.end_lsn
        return found

    async def _stream(self, conn: ReplicationConnection, stop: asyncio.Event) -> None:
        seg_size, server_tli, xlogpos = await self._prepare(conn)
        slot_lsn, slot_tli = await self._slot(conn)
        await self._archive_histories(conn, server_tli)
        self.announcer.reconcile(seg_size)
        self.writer = self.make_writer(seg_size)
        position = self._archive_position(seg_size)
        if position is None:
            tli, start = slot_tli or server_tli, slot_lsn or xlogpos
        else:
            tli, start = position
            if tli > server_tli:
                raise Permanent(
                    f"the archive of cluster '{self.cluster.name}' is on timeline {tli} but the "
                    f"server is on timeline {server_tli}",
                    hint="the conninfo points at an old primary or another cluster; point it at "
                    "the current primary",
                )
        start -= start % seg_size
        while not stop.is_set():
            try:
                ended = await self._replicate(conn, stop, tli, start, seg_size)
            except ServerError as exc:
                moved = await self._recover_start(exc, tli, start, slot_lsn, xlogpos, seg_size)
                if moved is None:
                    raise
                tli, start = moved
                continue
            if ended is None:
                return  # stopped
            if ended.next_timeline is None or ended.next_start is None:
                raise Retryable(
                    f"{conn.where} ended streaming (server shutting down?)",
                    hint="reconnecting with backoff",
                )
            await self.writer.close_partial(ended.next_start)
            await self._fetch_history(conn, ended.next_timeline)
            log.info(
                "cluster %s: timeline %d ended at %s; following timeline %d",
                self.cluster.name,
                tli,
                Lsn(ended.next_start),
                ended.next_timeline,
            )
            tli, start = ended.next_timeline, ended.next_start - ended.next_start % seg_size

    async def _recover_start(
        self, exc: ServerError, tli: int, start: int, slot_lsn: int, xlogpos: int, seg_size: int
    ) -> tuple[int, int] | None:
        text = str(exc)
        if "has already been removed" in text:
            resume = slot_lsn if slot_lsn > start else xlogpos
            resume -= resume % seg_size
            reason = f"the server no longer has WAL from {Lsn(start)}: {exc.message}"
            self.announcer.gap(tli, start, resume, reason)
            self.state.gaps.inc()
            log.error(
                "cluster %s: WAL gap on timeline %d from %s to %s: %s",
                self.cluster.name,
                tli,
                Lsn(start),
                Lsn(resume),
                reason,
            )
            assert self.writer is not None
            self.writer.seg = None
            return tli, resume
        if match := _FORKED.search(text):
            fork = Lsn.parse(match.group(2))
            log.warning(
                "cluster %s: the archive holds WAL on timeline %d past the point where the "
                "server's history left it (%s); it is kept, and streaming follows the new timeline",
                self.cluster.name,
                tli,
                fork,
            )
            assert self.writer is not None
            if self.writer.seg is not None:
                await self.writer.close_partial(int(self.writer.received))
            history = self.archive.list_history()
            nxt = min((t for t in history if t > tli), default=None)
            if nxt is None:
                return None
            return nxt, int(fork) - int(fork) % seg_size
        return None

    async def _replicate(
        self,
        conn: ReplicationConnection,
        stop: asyncio.Event,
        tli: int,
        start: int,
        seg_size: int,
    ) -> StreamEnded | None:
        writer = self.writer
        assert writer is not None
        if writer.seg is None or writer.seg.timeline != tli or writer.seg.start_lsn != start:
            writer.open(WalSegment.from_lsn(tli, start, seg_size), resume=True)
        await conn.start_replication(self.cluster.slot, start, tli)
        self.state.streaming(tli)
        if self.cluster.synchronous:
            return await self._pump(conn, stop)
        interval = self.cluster.status_interval
        last_flush = last_status = time.monotonic()
        reported = -1
        stop_wait: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
        waited = True  # the socket was just waited on, so consume_input already ran
        try:
            while not stop.is_set():
                reply = False
                try:
                    if not waited:
                        # WAL that arrived meanwhile: take it without a trip through the event
                        # loop (catching up, there always is some)
                        conn.consume_input()
                    while (msg := conn.read_message()) is not None:
                        if isinstance(msg, XLogData):
                            await writer.write(msg.start, msg.data)
                            self.state.received(len(msg.data), msg.wal_end)
                        elif isinstance(msg, Keepalive):
                            self.state.server_lsn = max(self.state.server_lsn, msg.wal_end)
                            reply = reply or msg.reply_requested
                        waited = True
                except StreamEnded:
                    await writer.flush()
                    return await conn.finish_copy()
                writer.poll()
                now = time.monotonic()
                if now - last_flush >= interval:
                    await writer.flush()
                    last_flush = now
                if reply or writer.durable != reported or now - last_status >= interval:
                    await conn.send_status(int(writer.received), int(writer.durable))
                    reported, last_status = int(writer.durable), now
                    self.state.flushed(int(writer.durable), int(writer.received))
                if waited:
                    waited = False  # look once more before sleeping
                    continue
                timeout = max(0.05, min(last_flush, last_status) + interval - now)
                await conn.wait_readable(timeout, stop_wait)
                waited = True
            await writer.flush()
            await conn.send_status(int(writer.received), int(writer.durable))
            self.state.flushed(int(writer.durable), int(writer.received))
            return None
        finally:
            stop_wait.cancel()

    async def _pump(self, conn: ReplicationConnection, stop: asyncio.Event) -> StreamEnded | None:
        """Stream as a synchronous standby on a thread of its own (see `pump.SyncPump`)."""
        writer = self.writer
        assert writer is not None
        pump = SyncPump(conn, writer, self.state, self.cluster.status_interval)
        watcher = asyncio.ensure_future(stop.wait())
        watcher.add_done_callback(lambda _: pump.stop())
        done = asyncio.get_running_loop().run_in_executor(self._thread, pump.run)
        try:
            ended = await done
        finally:
            watcher.cancel()
            pump.stop()
            await asyncio.wait([done])  # the thread must be out before anything else runs
            pump.close()
        if ended:
            await writer.flush()
            return await conn.finish_copy()
        await writer.flush()
        await conn.send_status(int(writer.received), int(writer.durable))
        self.state.flushed(int(writer.durable), int(writer.received))
        return None


def recover(writer: SegmentWriter, path: Path, seg: WalSegment) -> bool:
    """Close a complete ``.partial`` left behind the open one into the segment's object.

    A synchronous standby starts the next segment while the worker still writes the full one's
    object (its bytes are durable in its ``.partial``); a crash in between leaves both. Returns
    False, changing nothing, when ``path`` does not hold the whole segment.
    """
    keyring, size = writer.keyring, writer.seg_size
    _, plain, valid_end = read_partial(path, keyring, source=f"open segment {path}")
    if valid_end < size:
        return False
    stored = writer.archive.store_segment(
        seg.name, memoryview(plain)[:size], codec=writer.codec, keyring=keyring
    )
    path.unlink()
    fsio.fsync_dir(path.parent)
    writer.on_closed(ClosedSegment(seg.name, seg, seg.start_lsn, seg.end_lsn, stored, False))
    return True

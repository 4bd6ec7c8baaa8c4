"""WAL read through `CopyReader` (libpq's buffer lent, not copied), against a real server."""

from __future__ import annotations

from klio_common.pg.lsn import Lsn
from klio_common.replication import Keepalive, ReplicationConnection, XLogData
from klio_dev import PostgresServer

SEGMENT = 16 * 1024 * 1024


async def test_lent_wal_bytes_match_pg_wal_and_die_with_the_next_read(pg: PostgresServer) -> None:
    pg.execute("CREATE TABLE t AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 2e4) g")
    start = int(pg.current_lsn())
    start -= start % SEGMENT
    segment = pg.switch_wal()  # the segment is complete in pg_wal: compare with what is sent
    conn = await ReplicationConnection.connect(
        pg.conninfo(include_password=False), application_name="t", password=pg.password
    )
    try:
        await conn.start_replication(None, start, 1)
        received = bytearray()
        lent: list[memoryview] = []
        while len(received) < 1 << 20:
            msg = conn.read_message()
            if msg is None:
                await conn.wait_readable(5.0)
                continue
            assert isinstance(msg, XLogData | Keepalive)
            if isinstance(msg, XLogData):
                assert msg.start == start + len(received), f"gap before {Lsn(msg.start)}"
                received += msg.data
                lent.append(msg.data)
        expected = (pg.pg_wal_dir / segment).read_bytes()[: len(received)]
        assert received == expected
        assert lent[-1].readonly  # libpq's buffer is never written through the view
        with_next_read_gone = lent[:-1] if conn.reader._fns is not None else []
        for view in with_next_read_gone:
            try:
                bytes(view)
            except ValueError as exc:
                assert "released" in str(exc)
            else:
                raise AssertionError("a message lent by libpq outlived the next read")
    finally:
        conn.close()

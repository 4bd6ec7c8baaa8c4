"""WAL read through `CopyReader` (libpq's buffer lent, not copied), against a real server."""

from __future__ import annotations

from pathlib import Path

from klio_common.pg.lsn import Lsn
from klio_common.replication import Keepalive, ReplicationConnection, XLogData
from klio_dev import PostgresServer
from klio_dev.osuser import owned_by_postgres
from tests.fixtures.postgres import PgFactory
from tests.fixtures.tls import self_signed

SEGMENT = 16 * 1024 * 1024


async def _stream(pg: PostgresServer, **conninfo: str) -> tuple[bytearray, bytes, list[memoryview]]:
    """Stream 4 MiB of a completed segment: what was received, what pg_wal holds, the views."""
    pg.execute("CREATE TABLE t AS SELECT g, md5(g::text) AS pad FROM generate_series(1, 8e4) g")
    start = int(pg.current_lsn())
    start -= start % SEGMENT
    segment = pg.switch_wal()  # the segment is complete in pg_wal: compare with what is sent
    conn = await ReplicationConnection.connect(
        pg.conninfo(include_password=False, **conninfo), application_name="t", password=pg.password
    )
    received = bytearray()
    lent: list[memoryview] = []
    try:
        assert conn.conn.ssl_in_use == ("sslmode" in conninfo)
        await conn.start_replication(None, start, 1)
        while len(received) < 4 << 20:
            msg = conn.read_message()
            if msg is None:
                await conn.wait_readable(5.0)
                continue
            assert isinstance(msg, XLogData | Keepalive)
            if isinstance(msg, XLogData):
                assert msg.start == start + len(received), f"gap before {Lsn(msg.start)}"
                received += msg.data
                lent.append(msg.data)
    finally:
        conn.close()
    return received, (pg.pg_wal_dir / segment).read_bytes()[: len(received)], lent


async def test_lent_wal_bytes_match_pg_wal_and_die_with_the_next_read(pg: PostgresServer) -> None:
    received, expected, lent = await _stream(pg)
    assert received == expected
    for view in lent:  # every message was freed, its view released: a late use raises
        try:
            bytes(view)
        except ValueError as exc:
            assert "released" in str(exc)
        else:
            raise AssertionError("a message lent by libpq outlived the next read")


async def test_wal_streams_over_tls_verified_against_the_servers_certificate(
    pg_factory: PgFactory, tmp_path: Path
) -> None:
    pg = pg_factory(settings={"ssl": "on"}, start=False)
    key, cert = self_signed()
    for name, content in (("server.key", key), ("server.crt", cert)):
        (pg.data_dir / name).write_bytes(content)
        owned_by_postgres(pg.data_dir / name, 0o600)
    (tmp_path / "root.crt").write_bytes(cert)
    pg.start()
    received, expected, _ = await _stream(
        pg, sslmode="verify-full", sslrootcert=str(tmp_path / "root.crt")
    )
    assert received == expected  # TLS records split messages anywhere: none was lost or torn

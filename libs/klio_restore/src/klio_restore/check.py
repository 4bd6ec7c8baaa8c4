"""``klio check`` as a library: every precondition of a working installation, one result each."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klio_common import fsio
from klio_common.catalog.wal import WalArchive
from klio_common.errors import KlioError
from klio_common.pg.server import check_server_version, check_wal_level
from klio_common.runtime.settings import ClusterSettings, S3Settings, Settings

TIMEOUT = 10.0
"""Seconds any single check may take: an unreachable server fails, it does not hang."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: what was checked, prefixed by the cluster for per-cluster checks (``main/slot``).
        status: ``ok``, ``WARN`` (worth knowing, not a failure) or ``FAIL``.
        detail: what was found, or why it failed.
        hint: what the user can do, for failures.
    """

    name: str
    status: str
    detail: str
    hint: str | None = None

    @property
    def failed(self) -> bool:
        """Whether this check failed."""
        return self.status == "FAIL"


def ok(name: str, detail: str) -> CheckResult:
    """A passed check."""
    return CheckResult(name, "ok", detail)


def warn(name: str, detail: str, hint: str | None = None) -> CheckResult:
    """A warning: reported, not a failure."""
    return CheckResult(name, "WARN", detail, hint)


def fail(name: str, detail: str, hint: str | None = None) -> CheckResult:
    """A failed check."""
    return CheckResult(name, "FAIL", detail, hint)


def from_error(name: str, exc: BaseException) -> CheckResult:
    """A failed check from an exception (Klio errors keep their hint)."""
    if isinstance(exc, KlioError):
        return fail(name, exc.message, exc.hint)
    if isinstance(exc, TimeoutError):
        return fail(name, f"no answer within {TIMEOUT:.0f} s")
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return fail(name, f"{where}{exc.strerror}")
    return fail(name, str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))


async def run_checks(
    settings: Settings, clusters: list[ClusterSettings], *, timeout: float = TIMEOUT
) -> list[CheckResult]:
    """Run every check concurrently; each is bounded by ``timeout``.

    Args:
        settings: the loaded configuration (loading it is the ``config`` check).
        clusters: the clusters to check (all, or the one named by ``--cluster``).
        timeout: seconds per check.

    Returns:
        The results in a stable order: keys, NATS, bucket, then each cluster's.
    """
    jobs: list[tuple[str, Awaitable[list[CheckResult]]]] = [
        ("keys", asyncio.to_thread(check_keys, settings)),
        ("nats", check_nats(settings, timeout=timeout)),
    ]
    if settings.tier2 is not None:
        jobs.append(("tier2", check_bucket(settings.tier2.s3, timeout=timeout)))
    for cluster in clusters:
        archive = _archive(settings, cluster)
        jobs.append((f"{cluster.name}/postgres", check_postgres(cluster, archive, timeout=timeout)))
        jobs.append(
            (
                f"{cluster.name}/tier1",
                asyncio.to_thread(
                    check_tier1, cluster.name, archive, tier2=settings.tier2 is not None
                ),
            )
        )
    groups = await asyncio.gather(*(_bounded(name, job, timeout) for name, job in jobs))
    return [result for group in groups for result in group]


async def _bounded(
    name: str, job: Awaitable[list[CheckResult]], timeout: float
) -> list[CheckResult]:
    try:
        # The checks bound their own network waits; this is the backstop.
        return await asyncio.wait_for(job, timeout + 2.0)
    except Exception as exc:  # one broken check must not hide the others
        return [from_error(name, exc)]


def _archive(settings: Settings, cluster: ClusterSettings) -> WalArchive | None:
    if settings.tier1 is None:
        return None
    return WalArchive(
        settings.tier1.path,
        cluster.name,
        file_mode=settings.tier1.file_mode,
        dir_mode=settings.tier1.dir_mode,
    )


def check_keys(settings: Settings) -> list[CheckResult]:
    """Key files readable, 32 bytes each, the active one among them."""
    enc = settings.encryption
    if enc is None or not enc.keys:
        return [
            warn(
                "keys",
                "encryption is not configured: WAL and backups are stored unencrypted",
                hint="set encryption.active and encryption.keys (32-byte key files)",
            )
        ]
    try:
        keyring = enc.keyring()
    except KlioError as exc:
        return [from_error("keys", exc)]
    ids = ", ".join(sorted(keyring.key_ids))
    if keyring.active is None:
        return [warn("keys", f"keys {ids} readable; no active key: new objects are unencrypted")]
    return [ok("keys", f"{len(keyring.key_ids)} readable ({ids}); active key '{keyring.active}'")]


def check_tier1(
    cluster: str, archive: WalArchive | None, *, tier2: bool = False
) -> list[CheckResult]:
    """Tier 1 writable: create, fsync and remove a temporary file in the cluster's directory.

    Without Tier 1 but with a bucket (``tier2``), the configuration is the read-only
    disaster-recovery mode: a warning, not a failure.
    """
    name = f"{cluster}/tier1"
    if archive is None:
        if tier2:
            return [
                warn(
                    name,
                    "tier1.path is not set: read-only disaster-recovery mode (list, verify and "
                    "restore from the bucket; the services need Tier 1)",
                    hint="set tier1.path to the Tier-1 volume to run the services",
                )
            ]
        return [fail(name, "tier1.path is not set", hint="set tier1.path to the Tier-1 volume")]
    # Before the first WAL arrives the cluster directory does not exist: the receiver creates it
    # under the Tier-1 root, so that is what must be writable.
    target = archive.cluster_dir if archive.cluster_dir.is_dir() else archive.root
    probe = target / f".klio-check-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"klio check\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        probe.unlink(missing_ok=True)
        if exc.errno in fsio.NO_SPACE:
            return [fail(name, f"{target}: the volume is full", _FULL_HINT)]
        result = from_error(name, exc)
        return [fail(name, f"{target} is not writable: {result.detail}", _TIER1_HINT)]
    st = os.statvfs(target)
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    detail = f"{target} is writable; {_size(free)} free of {_size(total)}"
    if total and free < total * LOW_SPACE:
        used = 100 - 100 * free // total
        return [warn(name, f"{detail} ({used}% used): archiving stops when it is full", _FULL_HINT)]
    return [ok(name, detail)]


LOW_SPACE = 0.1
"""Below this share of the Tier-1 volume free, ``klio check`` warns."""
_TIER1_HINT = "run as the services' user, and check the volume is mounted read-write"
_FULL_HINT = (
    "grow the volume (PVC), or expire backups and WAL sooner (klio retention plan, then apply)"
)


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"


def describe_s3(s3: S3Settings) -> str:
    """``s3://bucket/prefix at endpoint`` for messages."""
    where = f" at {s3.endpoint_url}" if s3.endpoint_url else ""
    return f"s3://{s3.bucket}/{s3.prefix}{where}"


def results_document(results: list[CheckResult]) -> list[dict[str, Any]]:
    """The ``--json`` form: a list of objects."""
    return [
        {"name": r.name, "status": r.status.lower(), "detail": r.detail, "hint": r.hint}
        for r in results
    ]


def config_result(path: Path | None) -> CheckResult:
    """The ``config`` line for a configuration that loaded."""
    return ok("config", f"{path} is valid" if path else "configuration is valid")


# -- PostgreSQL ---------------------------------------------------------------------------------

_NO_REPLICATION = "must be superuser or replication role"
_HBA = "no pg_hba.conf entry"


async def check_postgres(
    cluster: ClusterSettings, archive: WalArchive | None, *, timeout: float = TIMEOUT
) -> list[CheckResult]:
    """Connect as the wal-receiver does (``replication=true``) and check the server.

    Checks: reachable, version ≥ 15, ``wal_level`` not minimal, the role may replicate, the slot
    exists (a warning when not: the receiver creates it), and the system identifier matches the
    archive's ``identity.json``.
    """
    import psycopg

    name = cluster.name
    kwargs: dict[str, Any] = {
        "replication": "true",
        "autocommit": True,
        "connect_timeout": max(2, int(timeout)),
        # Not the slot name: a synchronous_standby_names entry must never match this probe.
        "application_name": "klio-check",
    }
    try:
        password = cluster.password()
    except OSError as exc:
        return [from_error(f"{name}/postgres", exc)]
    if password is not None:
        kwargs["password"] = password
    try:
        conn = await psycopg.AsyncConnection.connect(cluster.conninfo, **kwargs)
    except psycopg.Error as exc:
        return [_connect_failure(cluster, exc)]
    results = []
    async with conn:
        info = conn.info
        results.append(
            ok(f"{name}/postgres", f"connected to {info.host}:{info.port} as {info.user}")
        )
        version = info.server_version
        results.append(_guard(f"{name}/version", check_server_version, version, _version(version)))
        cur = conn.cursor()
        await cur.execute("SHOW wal_level")
        level = _text((await cur.fetchone() or ("?",))[0])
        results.append(_guard(f"{name}/wal_level", check_wal_level, level, level))
        results.append(ok(f"{name}/replication role", f"role {info.user} may start replication"))
        await cur.execute(f"READ_REPLICATION_SLOT {cluster.slot}")  # slot names are [a-z0-9_]
        slot_row = await cur.fetchone()
        results.append(_slot_result(cluster, slot_row))
        await cur.execute("IDENTIFY_SYSTEM")
        ident_row = await cur.fetchone()
        system_id = _text(ident_row[0]) if ident_row else "?"
        results.append(_identity_result(name, system_id, archive))
    return results


def _connect_failure(cluster: ClusterSettings, exc: Exception) -> CheckResult:
    message = " ".join(str(exc).split())
    if _NO_REPLICATION in message:
        return fail(
            f"{cluster.name}/replication role",
            f"the role may not start replication: {message}",
            hint="ALTER ROLE <user> REPLICATION (the role in clusters[].conninfo)",
        )
    if _HBA in message:
        return fail(
            f"{cluster.name}/postgres",
            message,
            hint="add a 'host replication <user> <address> scram-sha-256' line to pg_hba.conf",
        )
    return fail(
        f"{cluster.name}/postgres",
        f"cannot open a replication connection: {message}",
        hint="check clusters[].conninfo, password_file and that the server accepts connections",
    )


def _guard(name: str, check: Callable[[Any], object], value: Any, shown: str) -> CheckResult:
    try:
        check(value)
    except KlioError as exc:
        return from_error(name, exc)
    return ok(name, shown)


def _version(num: int) -> str:
    return f"PostgreSQL {num // 10000}.{num % 10000}"


def _text(value: object) -> str:
    # A walsender sends text results; psycopg may hand them over as bytes.
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _slot_result(cluster: ClusterSettings, row: Any) -> CheckResult:
    name = f"{cluster.name}/slot"
    if row is None or row[0] is None:
        return warn(
            name,
            f"replication slot '{cluster.slot}' does not exist yet",
            hint="the wal-receiver creates it when it starts; until then the primary does not "
            "keep WAL for Klio",
        )
    kind = _text(row[0])
    if kind != "physical":
        return fail(
            name,
            f"replication slot '{cluster.slot}' is a {kind} slot",
            hint="Klio needs a physical slot: drop it or configure another slot name",
        )
    restart = _text(row[1]) if row[1] is not None else "none"
    return ok(name, f"physical slot '{cluster.slot}', restart_lsn {restart}")


def _identity_result(cluster: str, system_id: str, archive: WalArchive | None) -> CheckResult:
    name = f"{cluster}/system identifier"
    if archive is None:
        return ok(name, f"{system_id} (no Tier 1 configured to compare with)")
    try:
        identity = archive.read_identity()
    except (KlioError, OSError) as exc:
        return from_error(name, exc)
    if identity is None:
        return ok(name, f"{system_id} (no archive yet: recorded with the first WAL)")
    if identity.system_id != system_id:
        return fail(
            name,
            f"the server is system {system_id} but the archive of '{cluster}' at "
            f"{archive.cluster_dir} belongs to system {identity.system_id}",
            hint="each PostgreSQL cluster needs its own cluster name; a re-initialised cluster "
            "needs a new archive",
        )
    return ok(name, f"{system_id} matches the archive")


# -- NATS and the bucket ------------------------------------------------------------------------


async def check_nats(settings: Settings, *, timeout: float = TIMEOUT) -> list[CheckResult]:
    """NATS reachable and the ``KLIO`` stream exists."""
    from nats.js.errors import NotFoundError

    from klio_common.events.subjects import STREAM
    from klio_common.runtime.bus import Bus

    url = settings.nats.url
    try:
        bus = await Bus.connect(settings.nats, name="check", reconnect=False)
    except KlioError as exc:
        return [from_error("nats", exc)]
    results = [ok("nats", f"connected to {url}")]
    try:
        info = await asyncio.wait_for(bus.jetstream.stream_info(STREAM), timeout)
        storage = getattr(info.config.storage, "value", info.config.storage)
        results.append(
            ok("stream", f"stream {STREAM}: {info.state.messages} messages, {storage} storage")
        )
    except NotFoundError:
        results.append(
            fail(
                "stream",
                f"stream {STREAM} does not exist",
                hint="start any Klio service: each creates the stream when it starts",
            )
        )
    except Exception as exc:
        results.append(from_error("stream", exc))
    finally:
        await bus.close()
    return results


async def check_bucket(s3: S3Settings, *, timeout: float = TIMEOUT) -> list[CheckResult]:
    """The Tier-2 bucket exists and the standard AWS credential chain may list it."""
    from klio_common.storage.s3 import S3Store

    where = describe_s3(s3)
    store = S3Store(s3, connect_timeout=timeout / 2, read_timeout=timeout / 2, attempts=1)
    try:
        async with store:
            await store.check()
    except KlioError as exc:
        return [fail("tier2", f"{where}: {exc.message}", exc.hint)]
    return [ok("tier2", f"{where} is reachable and may be listed")]

"""Klio developer tooling: real PostgreSQL, nats-server and S3 processes for tests and demos."""

from klio_dev.nats import NatsServer
from klio_dev.osuser import PG_BIN, run_as_postgres
from klio_dev.ports import free_port, is_listening
from klio_dev.postgres import PostgresServer
from klio_dev.processes import ServerError, kill_all
from klio_dev.s3 import S3Server
from klio_dev.waiting import scaled, timeout_multiplier, wait_until, wait_until_async

__all__ = [
    "PG_BIN",
    "NatsServer",
    "PostgresServer",
    "S3Server",
    "ServerError",
    "free_port",
    "is_listening",
    "kill_all",
    "run_as_postgres",
    "scaled",
    "timeout_multiplier",
    "wait_until",
    "wait_until_async",
]

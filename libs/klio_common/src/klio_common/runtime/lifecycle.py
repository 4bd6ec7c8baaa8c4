"""How a service lives and dies: root tasks, one stop event, SIGTERM, grace, hard exit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from klio_common.errors import ConfigError, KlioError
from klio_common.runtime import logs
from klio_common.runtime.allocator import tune_allocator
from klio_common.runtime.health import Health
from klio_common.runtime.settings import ServiceSettings, Settings

log = logging.getLogger(__name__)

Main = Callable[[asyncio.Event, Health], Coroutine[Any, Any, None]]
"""A service's body: runs until the stop event is set, registers its readiness on Health."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

# The hard exit fires this long after the grace period: enough for drain and close, and still
# well inside a pod's terminationGracePeriodSeconds when grace is set a little below it.
_HARD_EXIT_MARGIN = 10.0


async def serve(
    main: Main,
    *,
    name: str,
    settings: ServiceSettings,
    stop: asyncio.Event | None = None,
    grace: float = 20.0,
    health: Health | None = None,
) -> int:
    """Run ``main`` and the health endpoint until ``main`` ends or ``stop`` is set.

    No signal handlers and no hard exit: tests run a real service in-process with this and
    stop it by setting ``stop``.

    Args:
        main: the service body, called as ``main(stop, health)``.
        name: the service name, for logs.
        settings: host, port and log level of the service.
        stop: set it to stop the service; a fresh event when None.
        grace: seconds ``main`` has to return after ``stop`` is set before it is cancelled.
        health: the health endpoint to serve; built from ``settings`` when None.

    Returns:
        0 after a clean stop, 1 when ``main`` raised, could not stop in time, or the health
        endpoint could not listen.
    """
    stop = stop if stop is not None else asyncio.Event()
    health = health if health is not None else Health(settings.http_host, settings.http_port)
    try:
        await health.start()
    except OSError as exc:
        log.error(
            "cannot listen on %s:%s: %s",
            settings.http_host,
            settings.http_port,
            exc.strerror or exc,
            extra={"hint": f"set services.{name}.http_port to a free port"},
        )
        return EXIT_FAILED
    main_task = asyncio.create_task(main(stop, health), name=f"{name}-main")
    stop_task = asyncio.create_task(stop.wait(), name=f"{name}-stop")
    try:
        await asyncio.wait({main_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            log.info("%s ended by itself, stopping", name)
        stop.set()
        health.set_ready("shutdown", False, "stopping")
        if not main_task.done():
            log.info("stopping %s", name, extra={"grace_seconds": grace})
            await asyncio.wait({main_task}, timeout=grace)
        if not main_task.done():
            log.error("%s did not stop within %ss: cancelling it", name, grace)
            main_task.cancel()
            await asyncio.wait({main_task})
            return EXIT_FAILED
    except asyncio.CancelledError:
        main_task.cancel()
        await asyncio.wait({main_task})
        raise
    finally:
        stop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stop_task
        await health.close()
    if main_task.cancelled():
        log.error("%s was cancelled", name)
        return EXIT_FAILED
    error = main_task.exception()
    if error is not None:
        logs.log_error(log, error, f"{name} failed")
        return EXIT_FAILED
    log.info("%s stopped", name)
    return EXIT_OK


def _hard_exit(name: str, after: float) -> None:
    log.critical("%s still running %ss after the stop request: exiting now", name, after)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(EXIT_FAILED)


def run_service(
    main: Main,
    *,
    name: str,
    settings: ServiceSettings,
    stop: asyncio.Event | None = None,
    grace: float = 20.0,
    hard_exit_after: float | None = None,
) -> int:
    """Run a service in a new event loop, the way its process does.

    SIGTERM and SIGINT only set the stop event. Once stop is set (by a signal or because a root
    task ended), a timer thread ends the process with ``os._exit(1)`` if it has not finished
    ``hard_exit_after`` seconds later, even when the event loop itself is stuck.

    Args:
        main: the service body, called as ``main(stop, health)``.
        name: the service name.
        settings: host, port and log level of the service.
        stop: an extra way to stop the service; a fresh event when None.
        grace: seconds ``main`` has to return after stop before it is cancelled.
        hard_exit_after: seconds from stop to the hard exit; ``grace`` + 10 when None.

    Returns:
        The exit code (see `serve`).
    """
    after = grace + _HARD_EXIT_MARGIN if hard_exit_after is None else hard_exit_after
    timer = threading.Timer(after, _hard_exit, (name, after))
    timer.daemon = True

    def arm() -> None:
        if timer.ident is None:  # not started yet
            timer.start()

    async def _run() -> int:
        event = stop if stop is not None else asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            arm()  # now, before any task runs: one of them may be what hangs the loop
            if event.is_set():
                log.info("%s already stopping", name)
                return
            log.info("received %s, stopping", signal.Signals(signum).name)
            event.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)

        async def arm_on_stop() -> None:
            await event.wait()
            arm()

        armer = asyncio.create_task(arm_on_stop())
        try:
            return await serve(main, name=name, settings=settings, stop=event, grace=grace)
        finally:
            armer.cancel()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    try:
        return asyncio.run(_run())
    finally:
        timer.cancel()


def main_entry(
    service_name: str,
    main_factory: Callable[[Settings], Main],
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> NoReturn:
    """The whole ``__main__`` of a service: options, settings, logging, run, exit.

    Args:
        service_name: ``wal-receiver``, ``basebackup``, ``relay`` or ``retention``.
        main_factory: builds the service body from the settings; may raise `KlioError`.
        argv: command-line arguments without the program name; ``sys.argv[1:]`` when None.
        env: the environment; ``os.environ`` when None.

    Raises:
        SystemExit: always, with the exit code: 0 clean stop, 1 failure, 2 invalid configuration.
    """
    raise SystemExit(_entry(service_name, main_factory, argv, env))


def _entry(
    service_name: str,
    main_factory: Callable[[Settings], Main],
    argv: Sequence[str] | None,
    env: Mapping[str, str] | None,
) -> int:
    parser = argparse.ArgumentParser(
        prog=f"klio-{service_name}", description=f"Klio {service_name} service"
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML configuration file (default: $KLIO_CONFIG)"
    )
    args = parser.parse_args(argv)
    environ = os.environ if env is None else env
    try:
        settings = Settings.load(args.config, environ)
    except ConfigError as exc:
        print(f"klio-{service_name}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    service = settings.service(service_name)
    logs.configure(service_name, service.log_level, environ)
    for warning in settings.warnings:
        log.warning(warning)
    try:
        main = main_factory(settings)
    except KlioError as exc:
        logs.log_error(log, exc, f"cannot start {service_name}")
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILED
    tune_allocator()
    return run_service(main, name=service_name, settings=service)

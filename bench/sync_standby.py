"""Benchmark 2: pgbench TPS with Klio or ``pg_receivewal --synchronous`` as the sync standby."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from bench.lab import CLUSTER, Child, Lab, drop_tree, klio_receiver, process_cpu, say
from klio_dev import wait_until

# klio_plain: the same receiver without encryption (a supported setup: encryption is optional).
# pg_receivewal_control: a second pg_receivewal, measured like the others: the baseline against
# itself, the spread this machine gives two identical standbys (the benchmark's resolution).
STANDBYS = ("pg_receivewal", "klio", "klio_plain", "pg_receivewal_control")
PG_RECEIVEWAL = ("pg_receivewal", "pg_receivewal_control")
APPLICATION_NAMES = {
    "pg_receivewal": "pgrw",
    "klio": "klio",
    "klio_plain": "klio_plain",
    "pg_receivewal_control": "pgrw_control",
}
TIMEOUT = 300.0


def run(lab: Lab, *, runs: int, seconds: int, scale: int) -> dict[str, Any]:
    """Rotate the standbys ``runs`` times each under ``pgbench -c 4 -j 2 -T seconds``.

    Returns:
        ``{"pgbench", "scale", "samples": {standby: [{"tps", "cpu_seconds", "seconds"}]}}``.
    """
    say(f"sync: pgbench -i -s {scale}")
    lab.pgbench_init(scale)
    samples: dict[str, list[dict[str, float]]] = {s: [] for s in STANDBYS}
    turns: list[str] = []  # Klio's loop in each of its runs: "native" or "python" (status)
    base = lab.root / "sync"
    for i in range(runs):
        turn = i % len(STANDBYS)  # each standby goes first in turn: run i of each is adjacent
        for standby in STANDBYS[turn:] + STANDBYS[:turn]:
            out = base / f"{standby}_{i}"
            slot = f"bench_sync_{standby}_{i}"
            lab.create_slots([slot])  # after a checkpoint: the standby starts near the end of WAL
            try:
                child = _start(lab, standby, out, slot)
                try:
                    sample = _measure(lab, child, APPLICATION_NAMES[standby], seconds)
                    if standby not in PG_RECEIVEWAL:
                        turns.append(_turn(out))
                finally:
                    # Never stop the only synchronous standby while it is required (pitfall P9).
                    _desynchronize(lab)
                    child.stop(signal.SIGINT if standby in PG_RECEIVEWAL else signal.SIGTERM)
            finally:
                lab.drop_slots([slot])
            samples[standby].append(sample)
            say(f"sync run {i + 1}/{runs} {standby}: {sample['tps']:.0f} tps")
            drop_tree(out)
    return {
        "pgbench": f"-c 4 -j 2 -T {seconds}",
        "scale": scale,
        "samples": samples,
        "klio_turns": turns,
    }


def _turn(out: Path) -> str:
    """Which loop Klio's receiver ran (`turn` in its status document)."""
    status = json.loads((out / "tier1" / CLUSTER / "wal" / "status.json").read_bytes())
    return str(status.get("turn"))


def _start(lab: Lab, standby: str, out: Path, slot: str) -> Child:
    log = out.parent / f"{out.name}.log"
    if standby not in PG_RECEIVEWAL:
        config = lab.klio_config(
            out,
            slot=slot,
            encrypted=standby == "klio",
            compression="zstd",
            synchronous=True,
            application_name=APPLICATION_NAMES[standby],
        )
        return klio_receiver(config, log)
    out.mkdir(parents=True)
    argv = lab.pg_receivewal(
        "--synchronous",
        "-d",
        lab.replication_conninfo(APPLICATION_NAMES[standby]),
        "-S",
        slot,
        "-D",
        str(out),
        "--no-loop",
    )
    return Child(argv, log, env=lab.client_env())


def _state(lab: Lab, application_name: str) -> tuple[str, str] | None:
    rows = lab.pg.sql(
        "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = %s",
        [application_name],
    )
    return (str(rows[0][0]), str(rows[0][1])) if rows else None


def _measure(lab: Lab, child: Child, application_name: str, seconds: int) -> dict[str, float]:
    # Only once the standby streams may it become synchronous (pitfall P9).
    child.wait_for(
        lambda: (_state(lab, application_name) or ("", ""))[0] == "streaming",
        TIMEOUT,
        f"standby {application_name} streaming",
    )
    lab.pg.set_config(synchronous_standby_names=application_name)
    child.wait_for(
        lambda: (_state(lab, application_name) or ("", ""))[1] == "sync",
        TIMEOUT,
        f"standby {application_name} synchronous",
    )
    cpu = process_cpu(child.pid)
    tps = lab.pgbench(seconds)
    cpu = process_cpu(child.pid) - cpu
    child.check_alive()
    return {"tps": tps, "cpu_seconds": cpu, "seconds": float(seconds)}


def _desynchronize(lab: Lab) -> None:
    lab.pg.set_config(synchronous_standby_names="")
    # The reload is asynchronous: wait until a new session sees the setting empty.
    wait_until(
        lambda: lab.pg.sql("SHOW synchronous_standby_names")[0][0] == "",
        60,
        "synchronous_standby_names to be reset",
    )

"""The retention planner over generated catalogs: what it deletes can never break what it keeps."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klio_common.errors import Permanent
from klio_common.pg.lsn import Lsn
from klio_common.pg.timeline import HistoryEntry, TimelineHistory
from klio_retention.planner import DeletionPlan, plan
from klio_retention.policy import Policy
from klio_retention.snapshot import BackupEntry, ChunkEntry, Snapshot, WalEntry

SEG = 16 << 20
NOW = datetime(2026, 6, 30, 12, 0, tzinfo=UTC)


def wal_name(tli: int, segno: int) -> str:
    return f"{tli:08X}{segno // 256:08X}{segno % 256:08X}"


@st.composite
def catalogs(draw: st.DrawFn) -> tuple[Snapshot, Policy, int, float]:
    """A tier: up to three timelines (2 from 1; 3 from 2 or from 1), WAL with gaps and old-primary
    tails, backups whose end times need not follow their LSNs, chunks, leases, relay and locks."""
    tier = draw(st.sampled_from([1, 2]))
    top = draw(st.integers(20, 60))
    spans: dict[int, tuple[int, int]] = {1: (0, top)}
    histories: dict[int, TimelineHistory] = {}
    switch2 = draw(st.integers(3, top - 5))
    if draw(st.booleans()):
        spans[1] = (0, min(top, switch2 + draw(st.integers(0, 3))))  # the old primary's tail
        spans[2] = (switch2, top)
        lsn2 = Lsn(switch2 * SEG + draw(st.integers(0, SEG - 1)))
        histories[2] = TimelineHistory(2, [HistoryEntry(1, lsn2, "failover")])
        if draw(st.booleans()):
            parent = draw(st.sampled_from([1, 2]))
            low = switch2 + 1
            switch3 = draw(st.integers(low, top - 1))
            spans[3] = (switch3, top)
            lsn3 = Lsn(switch3 * SEG + draw(st.integers(0, SEG - 1)))
            entries = [HistoryEntry(1, lsn2, "failover")] if parent == 2 else []
            histories[3] = TimelineHistory(3, [*entries, HistoryEntry(parent, lsn3, "again")])
    tier2 = tier == 1 and draw(st.booleans())
    wal: list[WalEntry] = []
    for tli, (begin, end) in spans.items():
        for segno in range(begin, end):
            if draw(st.integers(0, 9)) == 0:
                continue  # a gap
            partial = tli == 1 and 2 in spans and segno == spans[1][1] - 1 and draw(st.booleans())
            name = wal_name(tli, segno) + (".partial" if partial else "")
            relayed = not tier2 or draw(st.integers(0, 5)) > 0
            locked = "under object lock" if tier == 2 and draw(st.integers(0, 15)) == 0 else None
            wal.append(WalEntry(name, tli, segno, partial, 100 + segno, relayed, locked))
    pool = [f"{i:064x}" for i in range(30)]
    backups: list[BackupEntry] = []
    for index in range(draw(st.integers(0, 8))):
        tli = draw(st.sampled_from(sorted(spans)))
        begin, end = spans[tli]
        segno = draw(st.integers(begin, end - 1))
        start = segno * SEG + draw(st.integers(0, SEG - 1))
        backups.append(
            BackupEntry(
                id=f"b{draw(st.integers(0, 10**6)):07d}-{index}",
                timeline=tli,
                start_lsn=start,
                end_lsn=start + draw(st.integers(1, SEG)),
                end_time=NOW - timedelta(minutes=draw(st.integers(0, 20 * 24 * 60))),
                chunks=frozenset(draw(st.lists(st.sampled_from(pool), max_size=8))),
                size=1000 + index,
                relayed=not tier2 or draw(st.booleans()),
                locked="under object lock" if tier == 2 and draw(st.integers(0, 6)) == 0 else None,
            )
        )
    chunks = [
        ChunkEntry(
            cid,
            50,
            (NOW - timedelta(minutes=draw(st.integers(0, 3000)))).timestamp(),
            relayed=not tier2 or draw(st.booleans()),
        )
        for cid in draw(st.lists(st.sampled_from(pool), unique=True))
    ]
    snap = Snapshot(
        tier=tier,
        cluster="main",
        seg_size=SEG,
        backups=backups,
        wal=wal,
        histories=histories,
        chunks=chunks,
        in_progress=["lease"] if draw(st.integers(0, 4)) == 0 else [],
        tier2=tier2,
        protected_chunks=frozenset(draw(st.lists(st.sampled_from(pool), max_size=3)))
        if tier == 2
        else frozenset(),
    )
    if draw(st.booleans()):
        policy = Policy("window", draw(st.integers(1, 15)), "days")
    else:
        policy = Policy("redundancy", draw(st.integers(1, 6)))
    return snap, policy, draw(st.integers(1, 3)), float(draw(st.sampled_from([0, 600, 86400])))


def retained(result: DeletionPlan) -> set[str]:
    return {b.id for b in result.backups if b.action != "expire"}


PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(catalogs())
def test_every_kept_backup_keeps_its_whole_wal_chain(
    case: tuple[Snapshot, Policy, int, float],
) -> None:
    snap, policy, minimum, grace = case
    result = plan(snap, NOW, policy, minimum_redundancy=minimum, chunk_grace=grace)
    kept = [b for b in snap.backups if b.id in retained(result)]
    for backup in kept:
        first = backup.start_lsn // SEG
        # On every timeline, not only the backup's own: recovery may follow any later switch.
        assert all(w.segno < first for w in result.wal), (backup, result.wal)
    for entry in result.wal:
        assert entry.name.endswith(".partial") == entry.partial
        assert entry.segno < min(b.start_lsn for b in kept) // SEG


@PROPERTY
@given(catalogs())
def test_every_point_of_the_window_stays_restorable(
    case: tuple[Snapshot, Policy, int, float],
) -> None:
    snap, policy, minimum, grace = case
    window = dataclasses.replace(policy, kind="window")
    start = window.window_start(NOW)
    assert start is not None
    result = plan(snap, NOW, window, minimum_redundancy=minimum, chunk_grace=grace)
    keep = retained(result)
    points = [start, NOW] + [b.end_time for b in snap.backups if b.end_time >= start]
    for point in points:
        usable = [b for b in snap.backups if b.end_time <= point]
        if not usable:
            continue  # nothing could ever restore to this point
        best = max(usable, key=lambda b: (b.end_time, b.id))
        assert best.id in keep, (point, best)
        assert all(w.segno < best.start_lsn // SEG for w in result.wal)


@PROPERTY
@given(catalogs())
def test_minimum_redundancy_and_redundancy_hold(case: tuple[Snapshot, Policy, int, float]) -> None:
    snap, policy, minimum, grace = case
    result = plan(snap, NOW, policy, minimum_redundancy=minimum, chunk_grace=grace)
    by_end = sorted(snap.backups, key=lambda b: (b.end_time, b.id))
    keep = retained(result)
    wanted = minimum if policy.kind == "window" else max(minimum, policy.count)
    assert {b.id for b in by_end[-wanted:]} <= keep
    assert not snap.backups or keep
    # The decisions are listed by end time.
    assert [d.id for d in result.backups] == [b.id for b in by_end]


@PROPERTY
@given(catalogs())
def test_nothing_unrelayed_or_locked_or_in_use_is_deleted(
    case: tuple[Snapshot, Policy, int, float],
) -> None:
    snap, policy, minimum, grace = case
    result = plan(snap, NOW, policy, minimum_redundancy=minimum, chunk_grace=grace)
    by_id = {b.id: b for b in snap.backups}
    for decision in result.expired:
        assert by_id[decision.id].locked is None
        assert not snap.tier2 or by_id[decision.id].relayed
    assert all(w.locked is None for w in result.wal)
    if snap.tier2:
        assert all(w.relayed for w in result.wal)
        referenced_anywhere = set().union(*(b.chunks for b in snap.backups))
        assert all(c.relayed or c.id not in referenced_anywhere for c in result.chunks)
    held_paths = {h.path.rsplit("/", 1)[-1] for h in result.held}
    held = [w for w in snap.wal if w.name in held_paths]
    if held and result.wal:  # nothing after a held segment goes: the archive keeps no hole
        assert max(w.segno for w in result.wal) < min(w.segno for w in held)
    kept_chunks = set(snap.protected_chunks).union(*(by_id[i].chunks for i in retained(result)))
    for chunk in result.chunks:
        assert chunk.id not in kept_chunks
        assert chunk.mtime < NOW.timestamp() - grace
    if snap.in_progress:
        assert result.chunks == []


@PROPERTY
@given(catalogs())
def test_order_is_by_end_time_never_by_name(case: tuple[Snapshot, Policy, int, float]) -> None:
    snap, policy, minimum, grace = case
    renamed = dataclasses.replace(
        snap,
        backups=[dataclasses.replace(b, id=f"z{999 - i:03d}") for i, b in enumerate(snap.backups)],
    )
    first = plan(snap, NOW, policy, minimum_redundancy=minimum, chunk_grace=grace)
    second = plan(renamed, NOW, policy, minimum_redundancy=minimum, chunk_grace=grace)
    fates = {b.id: b.action for b in first.backups}
    renamed_fates = {b.id: b.action for b in second.backups}
    same_time = len({b.end_time for b in snap.backups}) == len(snap.backups)
    if same_time:  # ids only break ties between equal end times
        for i, backup in enumerate(snap.backups):
            assert fates[backup.id] == renamed_fates[f"z{999 - i:03d}"]
    assert [w.name for w in first.wal] == [w.name for w in second.wal] or not same_time


def test_recovery_window_keeps_the_newest_backup_before_it() -> None:
    backups = [
        BackupEntry(f"b{i}", 1, i * SEG, i * SEG + 10, NOW - timedelta(days=d), frozenset(), 10)
        for i, d in enumerate([10, 8, 5, 3, 1], start=1)
    ]
    wal = [WalEntry(wal_name(1, n), 1, n, False, 7) for n in range(0, 7)]
    snap = Snapshot(tier=1, cluster="main", seg_size=SEG, backups=backups, wal=wal)
    result = plan(snap, NOW, Policy("window", 4, "days"), minimum_redundancy=1)
    assert [(b.id, b.action) for b in result.backups] == [
        ("b1", "expire"),
        ("b2", "expire"),
        ("b3", "keep"),
        ("b4", "keep"),
        ("b5", "keep"),
    ]
    assert result.backups[0].reason == "outside RECOVERY WINDOW OF 4 DAYS"
    assert [w.segno for w in result.wal] == [0, 1, 2]
    assert result.bytes == 10 + 10 + 3 * 7


def test_a_held_segment_holds_the_ones_after_it() -> None:
    backups = [BackupEntry("b", 1, 9 * SEG, 9 * SEG + 1, NOW, frozenset(), 1)]
    wal = [WalEntry(wal_name(1, n), 1, n, False, 1, relayed=n != 4) for n in range(10)]
    snap = Snapshot(tier=1, cluster="main", seg_size=SEG, backups=backups, wal=wal, tier2=True)
    result = plan(snap, NOW, Policy("redundancy", 1))
    assert [w.segno for w in result.wal] == [0, 1, 2, 3]
    assert result.held[0].reason == "not yet copied to Tier 2"
    assert len(result.held) == 5


def test_timelines_outside_the_oldest_backups_lineage_are_kept() -> None:
    # Timeline 3 branched from 1 before timeline 2 did; the kept backup is on 2.
    histories = {
        2: TimelineHistory(2, [HistoryEntry(1, Lsn(5 * SEG + 100), "x")]),
        3: TimelineHistory(3, [HistoryEntry(1, Lsn(3 * SEG + 100), "y")]),
    }
    wal = [WalEntry(wal_name(1, n), 1, n, False, 1) for n in range(6)]
    wal += [WalEntry(wal_name(3, n), 3, n, False, 1) for n in range(3, 5)]
    wal += [WalEntry(wal_name(2, n), 2, n, False, 1) for n in range(5, 10)]
    backups = [BackupEntry("b", 2, 8 * SEG, 8 * SEG + 1, NOW, frozenset(), 1)]
    snap = Snapshot(1, "main", SEG, backups=backups, wal=wal, histories=histories)
    result = plan(snap, NOW, Policy("redundancy", 1))
    assert {(w.timeline, w.segno) for w in result.wal} == {(1, n) for n in range(6)} | {
        (2, n) for n in range(5, 8)
    }


def test_refuses_a_plan_that_keeps_nothing() -> None:
    backups = [BackupEntry("b", 1, 0, 1, NOW, frozenset(), 1)]
    snap = Snapshot(1, "main", SEG, backups=backups)
    with pytest.raises(Permanent, match="would keep none"):
        plan(snap, NOW, Policy("redundancy", 0), minimum_redundancy=0)


def test_the_benchmark_plans_both_tiers() -> None:
    from bench import retention_plan

    result = retention_plan.run(runs=1, quick=True)
    assert set(result["tiers"]) == {"1", "2"}
    for row in result["tiers"].values():
        assert row["expired"] > 0 and row["wal_deleted"] > 0 and row["chunks_deleted"] > 0
    assert "| 1 | RECOVERY WINDOW OF 30 DAYS |" in retention_plan.render(result)

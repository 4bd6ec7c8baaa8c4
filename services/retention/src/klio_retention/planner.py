"""The deletion plan of one tier: a pure function of a catalog snapshot, the time and the policy.

Backups are ordered by end time only. The WAL that goes is what lies before the start of the
oldest kept backup's WAL chain, on that backup's timeline and its ancestors, compared as numbers;
history files always stay. Chunks go when no kept backup references them and no backup is in
progress. Data not yet on Tier 2 (Tier 1 only) and objects under object lock are held, with the
reason, and a held segment also holds the segments after it so the archive never gets a hole.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from klio_common.errors import Permanent
from klio_common.pg.lsn import Lsn
from klio_common.storage.layout import wal_path
from klio_retention.policy import Policy
from klio_retention.snapshot import BackupEntry, ChunkEntry, Snapshot, WalEntry

Action = Literal["keep", "expire", "hold"]
NOT_RELAYED = "not yet copied to Tier 2"


@dataclass(frozen=True)
class BackupDecision:
    """What happens to one backup, and why."""

    id: str
    timeline: int
    end_time: datetime
    action: Action
    reason: str
    size: int


@dataclass(frozen=True)
class Held:
    """An object the policy would delete that stays for now (relative path, reason)."""

    path: str
    reason: str


@dataclass
class DeletionPlan:
    """What one run deletes from one tier, in the order it deletes it.

    Attributes:
        tier: 1 or 2.
        cluster: the cluster.
        now: the time the plan was made for.
        policy: the policy's canonical text.
        window_start: the oldest point kept restorable (recovery window), else None.
        minimum_redundancy: the newest this many backups are always kept.
        backups: every backup, oldest end time first, with its fate.
        leftovers: directories of crashed or half-deleted backups to remove.
        wal: segments and closed partials to delete.
        chunks: chunks to delete.
        held: WAL the policy would delete that stays, with the reason.
        chunks_held: chunks that stay although no kept backup references them: reason → count.
        wal_chain_start: where the oldest kept backup's WAL chain starts (timeline, LSN).
        asides: chunks a crashed run left renamed aside, to put back first.
    """

    tier: int
    cluster: str
    now: datetime
    policy: str
    window_start: datetime | None
    minimum_redundancy: int
    backups: list[BackupDecision] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    wal: list[WalEntry] = field(default_factory=list)
    chunks: list[ChunkEntry] = field(default_factory=list)
    held: list[Held] = field(default_factory=list)
    chunks_held: dict[str, int] = field(default_factory=dict)
    wal_chain_start: tuple[int, int] | None = None
    asides: list[str] = field(default_factory=list)

    @property
    def expired(self) -> list[BackupDecision]:
        """The backups to delete."""
        return [b for b in self.backups if b.action == "expire"]

    @property
    def bytes(self) -> int:
        """Stored bytes the plan frees: manifests, WAL and chunks."""
        return (
            sum(b.size for b in self.expired)
            + sum(w.size for w in self.wal)
            + sum(c.size for c in self.chunks)
        )

    @property
    def empty(self) -> bool:
        """Nothing to delete."""
        return not (self.expired or self.leftovers or self.wal or self.chunks)

    def document(self) -> dict[str, Any]:
        """The JSON of ``klio retention plan --json``."""
        chain = None
        if self.wal_chain_start is not None:
            chain = {"timeline": self.wal_chain_start[0], "lsn": str(Lsn(self.wal_chain_start[1]))}
        return {
            "cluster": self.cluster,
            "tier": self.tier,
            "policy": self.policy,
            "now": self.now.isoformat(),
            "window_start": self.window_start.isoformat() if self.window_start else None,
            "minimum_redundancy": self.minimum_redundancy,
            "backups": [
                {
                    "id": b.id,
                    "timeline": b.timeline,
                    "end_time": b.end_time.isoformat(),
                    "action": b.action,
                    "reason": b.reason,
                    "bytes": b.size,
                }
                for b in self.backups
            ],
            "expire": [b.id for b in self.expired],
            "leftovers": self.leftovers,
            "wal_chain_start": chain,
            "wal": {
                "count": len(self.wal),
                "bytes": sum(w.size for w in self.wal),
                "first": self.wal[0].name if self.wal else None,
                "last": self.wal[-1].name if self.wal else None,
                "files": [w.name for w in self.wal],
            },
            "chunks": {"count": len(self.chunks), "bytes": sum(c.size for c in self.chunks)},
            "held": [{"path": h.path, "reason": h.reason} for h in self.held],
            "chunks_held": self.chunks_held,
            "bytes": self.bytes,
        }


def plan(
    snapshot: Snapshot,
    now: datetime,
    policy: Policy | None,
    *,
    minimum_redundancy: int = 1,
    chunk_grace: float = 0.0,
) -> DeletionPlan:
    """Decide what goes from one tier.

    Args:
        snapshot: the tier's catalog.
        now: the time to plan for (a recovery window ends here).
        policy: the tier's policy; None keeps every backup (only WAL and chunks no backup needs
            go: what the executor runs once expired manifests are gone).
        minimum_redundancy: the newest this many backups are always kept.
        chunk_grace: seconds: chunks written after ``now`` minus this stay (a backup that
            starts while retention runs may be writing or reusing them).

    Returns:
        The plan.

    Raises:
        Permanent: the plan would keep no backup although there are some (refused).
    """
    window_start = policy.window_start(now) if policy is not None else None
    result = DeletionPlan(
        tier=snapshot.tier,
        cluster=snapshot.cluster,
        now=now,
        policy=policy.describe() if policy is not None else "keep every backup",
        window_start=window_start,
        minimum_redundancy=minimum_redundancy,
        leftovers=list(snapshot.leftovers),
        asides=list(snapshot.asides),
    )
    ordered = sorted(snapshot.backups, key=lambda b: (b.end_time, b.id))
    result.backups = _decide(snapshot, ordered, policy, window_start, minimum_redundancy)
    if ordered and all(d.action == "expire" for d in result.backups):
        raise Permanent(
            f"retention of cluster '{snapshot.cluster}' on tier {snapshot.tier} refused: "
            f"the policy {result.policy} would keep none of its {len(ordered)} backups",
            hint="use a policy that keeps at least one backup",
        )
    kept_ids = {d.id for d in result.backups if d.action != "expire"}
    kept = [b for b in ordered if b.id in kept_ids]
    _plan_wal(snapshot, kept, result)
    _plan_chunks(snapshot, kept, now.timestamp() - chunk_grace, result)
    return result


def _decide(
    snapshot: Snapshot,
    ordered: list[BackupEntry],
    policy: Policy | None,
    window_start: datetime | None,
    minimum_redundancy: int,
) -> list[BackupDecision]:
    count = len(ordered)
    # The newest backup ending before the window's start: recovery to the window's first
    # moments starts from it.
    anchor = None
    if window_start is not None:
        before = [i for i, b in enumerate(ordered) if b.end_time < window_start]
        anchor = before[-1] if before else None
    decisions = []
    for index, backup in enumerate(ordered):
        newest_rank = count - index  # 1 = the newest
        action: Action = "keep"
        if policy is None:
            reason = "kept"
        elif policy.kind == "redundancy" and newest_rank <= policy.count:
            reason = f"one of the newest {policy.count} ({policy.describe()})"
        elif window_start is not None and backup.end_time >= window_start:
            reason = f"ends inside the {policy.describe()}"
        elif index == anchor:
            reason = "the newest backup ending before the window: recovery to its start needs it"
        elif newest_rank <= minimum_redundancy:
            reason = f"minimum redundancy {minimum_redundancy}"
        else:
            action = "expire"
            word = "beyond" if policy.kind == "redundancy" else "outside"
            reason = f"{word} {policy.describe()}"
        if action == "expire" and backup.locked is not None:
            action, reason = "hold", f"{reason}, but {backup.locked}"
        elif action == "expire" and snapshot.tier == 1 and snapshot.tier2 and not backup.relayed:
            action, reason = "hold", f"{reason}, but {NOT_RELAYED}"
        decisions.append(
            BackupDecision(backup.id, backup.timeline, backup.end_time, action, reason, backup.size)
        )
    return decisions


def _wal_hold(snapshot: Snapshot, entry: WalEntry) -> str | None:
    if entry.locked is not None:
        return entry.locked
    if snapshot.tier == 1 and snapshot.tier2 and not entry.relayed:
        return NOT_RELAYED
    return None


def _plan_wal(snapshot: Snapshot, kept: list[BackupEntry], result: DeletionPlan) -> None:
    if not kept:
        return  # WAL is only ever cut behind a backup that is kept
    oldest = min(kept, key=lambda b: (b.start_lsn, b.timeline))
    result.wal_chain_start = (oldest.timeline, oldest.start_lsn)
    cut = oldest.start_lsn // snapshot.seg_size
    history = snapshot.histories.get(oldest.timeline)
    lineage = set(history.timelines()) if history is not None else {oldest.timeline}
    candidates = sorted(
        (w for w in snapshot.wal if w.timeline in lineage and w.segno < cut),
        key=lambda w: (w.segno, w.timeline, w.partial),
    )
    holds = {w.name: why for w in candidates if (why := _wal_hold(snapshot, w)) is not None}
    first = next((w for w in candidates if w.name in holds), None)
    for entry in candidates:
        if entry.name in holds:
            result.held.append(Held(wal_path(entry.name), holds[entry.name]))
        elif first is not None and entry.segno >= first.segno:
            # Deleting past a held segment would leave a hole that `klio wal verify` reports.
            result.held.append(Held(wal_path(entry.name), f"after the held {first.name}"))
        else:
            result.wal.append(entry)
    result.wal.sort(key=lambda w: (w.timeline, w.segno, w.partial))


def _plan_chunks(
    snapshot: Snapshot, kept: list[BackupEntry], cutoff: float, result: DeletionPlan
) -> None:
    referenced: set[str] = set(snapshot.protected_chunks)
    for backup in kept:
        referenced |= backup.chunks
    everywhere: set[str] = set()
    if snapshot.tier == 1 and snapshot.tier2:
        for backup in snapshot.backups:
            everywhere |= backup.chunks
    held: Counter[str] = Counter()
    blocker = snapshot.in_progress[0] if snapshot.in_progress else None
    for chunk in snapshot.chunks:
        if chunk.id in referenced:
            continue
        if blocker is not None:
            why = f"backup {blocker} is in progress (it may reference them)"
        elif chunk.locked is not None:
            why = chunk.locked
        elif chunk.mtime >= cutoff:
            why = "written within the grace period (a starting backup may reference them)"
        elif not chunk.relayed and chunk.id in everywhere:
            why = NOT_RELAYED
        else:
            result.chunks.append(chunk)
            continue
        held[why] += 1
    result.chunks.sort(key=lambda c: c.id)
    result.chunks_held = dict(held)

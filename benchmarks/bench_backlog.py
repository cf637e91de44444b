"""Benchmark 5: what a claim costs with 1,000, 10,000 and 100,000 messages waiting.

A consumer lists ``new/`` once and then claims from that listing, so its
first claim pays for the listing (and the sort) and every later one is a
rename.  Each round starts a fresh consumer on each backlog (sizes
interleaved), times its first claim and the next ``K`` claims, finishes them
and tops the backlog up again, untimed.  A consumer that drains a backlog of
``n`` pays one listing per ``n`` claims: the drain cost per message is the
steady claim plus the listing divided by ``n``.

For contrast, the hand-written consumer lists ``new/`` for every claim (the
O(n) per message that makes a naive maildir consumer O(n^2) per backlog).
"""

from __future__ import annotations

import gc
import os
import statistics
import time

import handwritten as hw
from _harness import PAYLOAD, Case, Factory, Settings, Table, describe, verdict, workdir

from atomstore import Claim, FileStore

SIZES = (1_000, 10_000, 100_000)


def _fill(store: FileStore, count: int) -> None:
    """Put ``count`` messages in ``new/`` under the store's own unique names.

    Written straight into ``new/``: a backlog is set-up here, not measured,
    and 100,000 deliveries through add() would double the benchmark's time.
    """
    new = os.path.join(store.path, "new")
    for _ in range(count):
        fd = os.open(os.path.join(new, store.unique_name()), hw.FILE_FLAGS, 0o666)
        hw.write_all(fd, PAYLOAD)
        os.close(fd)


def _claim_case(waiting: int, hand: bool) -> Factory:
    """A claim and finish with ``waiting`` messages behind it (for strace)."""

    def make(directory: str) -> Case:
        store = FileStore(directory, durable=False)
        store.prepare()
        _fill(store, waiting)
        if hand:
            spool = hw.Spool(directory, False)

            def op() -> None:
                claimed = spool.claim()
                assert claimed is not None
                spool.finish(claimed)

            return Case("hand-written claim", op)

        def claim_op() -> None:
            claim = store.claim()
            assert claim is not None
            claim.finish()

        return Case("atomstore claim", claim_op)

    return make


def claim_contenders() -> list[tuple[str, Factory]]:
    return [
        ("claim/hand", _claim_case(2000, True)),
        ("claim/atomstore", _claim_case(2000, False)),
    ]


def _timed_claims(consumer: FileStore, count: int) -> tuple[float, float, list[Claim]]:
    """The first claim's time, the mean of the next ``count``, and the claims."""
    claims: list[Claim] = []
    gc.collect()
    gc.disable()
    try:
        start = time.thread_time()
        first = consumer.claim()
        listed = time.thread_time()
        for _ in range(count):
            claim = consumer.claim()
            assert claim is not None
            claims.append(claim)
        done = time.thread_time()
    finally:
        gc.enable()
    assert first is not None
    claims.append(first)
    return listed - start, (done - listed) / count, claims


def _timed_hand_claims(root: str, count: int) -> float:
    spool = hw.Spool(root, False)
    claimed = []
    gc.collect()
    gc.disable()
    try:
        start = time.thread_time()
        for _ in range(count):
            path = spool.claim()
            assert path is not None
            claimed.append(path)
        elapsed = time.thread_time() - start
    finally:
        gc.enable()
    for path in claimed:
        spool.finish(path)
    return elapsed / count


def run(settings: Settings) -> list[Table]:
    steady_n = settings.pick(200, 100)  # well below the smallest backlog
    hand_n = settings.pick(5, 3)
    rounds = settings.pick_rounds(15, 5)
    first: dict[int, list[float]] = {n: [] for n in SIZES}
    steady: dict[int, list[float]] = {n: [] for n in SIZES}
    naive: dict[int, list[float]] = {n: [] for n in SIZES}
    with workdir(settings.tmpfs, "backlog", settings.keep) as base:
        producers = {}
        for n in SIZES:
            producers[n] = FileStore(os.path.join(base, f"n{n}"), durable=False)
            producers[n].prepare()
            _fill(producers[n], n)
        for r in range(rounds):
            shift = r % len(SIZES)
            for n in SIZES[shift:] + SIZES[:shift]:
                producer = producers[n]
                listing, per_claim, claims = _timed_claims(
                    FileStore(producer.path, durable=False), steady_n
                )
                first[n].append(listing)
                steady[n].append(per_claim)
                for claim in claims:
                    claim.finish()
                _fill(producer, len(claims))
                naive[n].append(_timed_hand_claims(producer.path, hand_n))
                _fill(producer, hand_n)
                waiting = len(os.listdir(os.path.join(producer.path, "new")))
                if waiting != n:
                    raise AssertionError(f"backlog {n} holds {waiting} messages")
    body = []
    base_steady = statistics.median(steady[SIZES[0]])
    base_drain = base_steady + statistics.median(first[SIZES[0]]) / SIZES[0]
    steadies, drains = [], []
    for n in SIZES:
        s = statistics.median(steady[n])
        f = statistics.median(first[n])
        drain = s + f / n
        steadies.append(s)
        drains.append(drain)
        body.append(
            [
                f"{n:,}",
                f"{s * 1e6:.1f}",
                f"{s / base_steady:.2f}x",
                f"{f * 1e3:.1f}",
                f"{drain * 1e6:.1f}",
                f"{drain / base_drain:.2f}x",
                f"{statistics.median(naive[n]) * 1e6:.0f}",
            ]
        )
    table = Table(
        "5. Claim cost with a backlog waiting (FileStore, not durable)",
        [],
        where=f"tmpfs: {describe(settings.tmpfs)}; {rounds} rounds of {steady_n} claims",
        plain=body,
        headings=[
            "waiting",
            "claim us",
            "ratio",
            "first claim ms",
            "drain us/msg",
            "ratio",
            "hand-written us",
        ],
    )
    table.notes.append(
        "claim us: a claim after the consumer's first (a rename from its listing); "
        "first claim: a fresh consumer's first claim, which lists and sorts new/; "
        "drain: claim us + first claim / waiting, the cost per message of draining the backlog"
    )
    table.notes.append(
        f"hand-written us: one claim that lists new/ and renames its oldest entry, "
        f"{hand_n} per round"
    )
    # Flat: the dearest size against the cheapest, whichever they are.
    steady_spread = max(steadies) / min(steadies)
    drain_spread = max(drains) / min(drains)
    table.targets.append(
        f"claim cost flat within 1.5x from 1,000 to 100,000 waiting: "
        f"{verdict(steady_spread <= 1.5)} (dearest / cheapest: {steady_spread:.2f}x)"
    )
    table.targets.append(
        f"drain cost per message flat within 1.5x: {verdict(drain_spread <= 1.5)} "
        f"({drain_spread:.2f}x)"
    )
    return [table]

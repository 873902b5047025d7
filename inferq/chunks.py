"""Background work's chunks: batch messages that job drivers and stream consumers send,
sized so that live requests behind them hardly wait (ARCHITECTURE.md, "Glossary": chunk)."""

from __future__ import annotations

NICENESS = 10  # background work's CPU priority (job drivers, stream consumers): live first
CHUNK_FLOOR_SECONDS = 0.002  # a chunk may always take this long (about a request's overhead)
CHUNK_SLOWER = 1.5  # ... or this many times as long as a single sample
SIZER_RETRY = 64  # answers after which a size found too slow is tried again


class ChunkSizer:
    """How many samples the next chunk takes: as many as keep it about as quick to predict
    as a single sample (at least :data:`CHUNK_FLOOR_SECONDS`), up to ``batch_size``.

    A synchronous request that arrives while a job (or a stream) is being worked through waits
    for a replica to finish the chunk it holds, so the time a chunk takes is what background
    work adds to live latency. A model
    whose cost is per call (a GPU's batch, numpy) keeps chunks of ``batch_size``; one whose
    cost is per sample (``predict`` at 10 ms each) gets chunks of a sample or two. Sizes start
    at 1 (the time of one sample is measured first), double while answers come back within
    the bound, and halve when one does not; a size that was too slow is not tried again
    until :data:`SIZER_RETRY` answers later (a busy moment must not cap a job forever).
    """

    def __init__(self, batch_size: int) -> None:
        self.most = batch_size
        self.size = 1
        self.single: float | None = None  # the quickest chunk of one sample seen
        self.ceiling = batch_size + 1  # a size known to be too slow
        self.since_slow = 0

    def may_send(self, awaiting: bool) -> bool:
        """Whether another chunk may go out (``awaiting``: chunks sent await their answers):
        not before the time of one sample is measured. Chunks sent before that would all be
        of one sample (a sender outpaces the answers it collects whenever the replica is quick
        and the sender, at a lower priority, waits for a core), and so would a whole backlog.
        """
        return self.single is not None or not awaiting

    def answered(self, samples: int, took: float) -> None:
        if samples == 1:
            self.single = took if self.single is None else min(self.single, took)
        if self.single is None or samples < 1:
            return
        bound = max(CHUNK_FLOOR_SECONDS, CHUNK_SLOWER * self.single)
        if took > bound:
            self.ceiling = min(self.ceiling, samples)
            self.size = min(self.size, max(1, samples // 2))
            self.since_slow = 0
            return
        self.since_slow += 1
        if self.since_slow >= SIZER_RETRY:
            self.ceiling, self.since_slow = self.most + 1, 0
        if samples >= self.size:
            self.size = max(1, min(samples * 2, self.ceiling - 1, self.most))

"""The gateway's picture of its workers: one record per slot.

The supervisor writes these records from control messages and process events;
the dispatcher reads them to pick a worker and keeps ``inflight``; /health
reads them. Everything runs on the gateway's one event loop, so no locks.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.pool.placement import Placement
from gateway.pool.transport import REMOTE
from shared import protocol
from shared.restarts import crash_looping

if TYPE_CHECKING:
    from gateway.pool.deaths import Death
    from gateway.pool.pending import Pending
    from gateway.pool.process import ProcessHandle


class Role(str, enum.Enum):
    """Where a record stands in its slot; only CURRENT records take new requests."""

    CURRENT = "current"  # the slot's worker
    SUCCESSOR = "successor"  # booting to replace the slot's worker (recycle, reload); not serving
    RETIRING = "retiring"  # replaced or let go of; finishing what it holds, then stopping


class State(str, enum.Enum):
    STARTING = "starting"  # spawned, not yet heard from or not yet loading
    LOADING = "loading"  # loading the model
    READY = "ready"  # serving (shown as "busy" while it holds requests)
    RESTARTING = "restarting"  # died or went silent; a replacement is on its way
    FAILED = "failed"  # cannot load its model; not restarted
    STOPPED = "stopped"  # stopped on purpose


# A record in one of these states will be ready unless it dies first.
_ON_THE_WAY = frozenset({State.STARTING, State.LOADING, State.RESTARTING})
# A READY worker that holds requests, as /health and the metrics show it.
BUSY = "busy"
# Every state a worker is shown in (/health, the metrics' state series), in order.
SHOWN_STATES: tuple[str, ...] = tuple(
    shown
    for state in State
    for shown in ((state.value, BUSY) if state is State.READY else (state.value,))
)


class DeathCause(str, enum.Enum):
    """Why a worker died unplanned, as the metrics count it (``worker_deaths``)."""

    SIGNAL = "signal"
    EXIT = "exit"
    LOAD_FAILED = "load_failed"
    HEARTBEAT = "heartbeat"
    HELLO_TIMEOUT = "hello_timeout"
    UNREACHABLE = "unreachable"
    BATCH_TIMEOUT = "batch_timeout"
    KILLED_OUTSIDE = "killed_outside"
    OOM = "oom"

    @property
    def explained(self) -> str:
        """The cause with a word on what it means, where its name does not say."""
        note = _DEATH_NOTES.get(self)
        return f"{self.value} ({note})" if note else self.value


_DEATH_NOTES = {
    DeathCause.EXIT: "non-zero or unexpected",
    DeathCause.HEARTBEAT: "went silent",
    DeathCause.BATCH_TIMEOUT: "a forward pass ran past --max-batch-seconds",
    DeathCause.KILLED_OUTSIDE: "a SIGKILL the gateway did not send",
    DeathCause.OOM: "a SIGKILL the cgroup counts as the OOM killer's",
}


@dataclass
class WorkerRecord:
    """One pool slot and the process currently filling it."""

    placement: Placement
    generation: int = 0
    role: Role = Role.CURRENT
    # The model this worker serves; it prefixes a local worker's uid, so uids
    # stay unique across the pools of one gateway.
    model: str = ""
    # A remote worker names itself; it reaches us over the remote link.
    remote_uid: str | None = None
    link: int = 0
    device_label: str | None = None
    state: State = State.STARTING
    process: ProcessHandle | None = None
    pid: int | None = None
    host: str | None = None
    capacity: int = 1
    rss_bytes: int | None = None
    pss_bytes: int | None = None
    private_bytes: int | None = None
    shared_pss_bytes: int | None = None
    cuda_allocated_bytes: int | None = None
    cuda_reserved_bytes: int | None = None
    load_seconds: float | None = None
    input_shape: list[int] | None = None
    input_dtype: str | None = None
    # READY's model description (source, outputs) for /v2/models/{name}.
    signature: dict[str, Any] | None = None
    requests_served: int = 0
    restarts: int = 0
    # Boots in a row that ended before the worker became ready (the backoff's count).
    boot_failures: int = 0
    # Of those, the ones the worker died of by itself: a SIGKILL from outside
    # while it booted (a chaos monkey, an operator) says nothing of the model.
    # From CRASH_LOOP_BOOTS of them the slot is in a crash loop: nobody waits for it.
    crash_boots: int = 0
    last_seen: float | None = None  # time.monotonic() of the last control message
    spawned_at: float | None = None  # time.monotonic() of the last spawn
    # Wants a successor (recycling): the reconcile step starts one and hands over.
    recycling: bool = False
    recycle_reason: str = ""  # the limit it passed, when ``recycling``
    # When a RESTARTING slot may be refilled (its backoff over); None: not waiting.
    respawn_at: float | None = None
    # Declared lost while it was READY: its death is not a boot failure.
    lost_when_ready: bool = False
    recycle_not_before: float = 0.0  # after a failed recycle, when to try again
    exit_code: int | None = None
    last_error: str | None = None
    # Why the supervisor ended (or is ending) this process, decided before it is
    # reaped: killed as hung, retired for a recycle... None: nobody planned its end.
    verdict: Death | None = None
    # How the slot's last process ended; kept after the replacement is ready.
    last_death: Death | None = None
    inflight: dict[int, Pending] = field(default_factory=dict)
    # Forward passes by batch rows, as this process last reported (cumulative).
    batches_seen: dict[int, int] = field(default_factory=dict)
    # Its HEARTBEAT ``waits`` as last reported: bucket counts and their sum.
    waits_seen: list[int] = field(default_factory=list)
    wait_sum_seen: float = 0.0
    # Intra-op threads of its last forward pass (HEARTBEAT ``threads``); None: none yet.
    threads: int | None = None
    # Forward passes by thread count, as this process last reported (cumulative).
    thread_passes_seen: dict[int, int] = field(default_factory=dict)

    @property
    def slot(self) -> int:
        return self.placement.slot

    @property
    def uid(self) -> str:
        if self.remote_uid:
            return self.remote_uid
        prefix = f"{self.model}/" if self.model else ""
        return f"{prefix}{self.slot}.{self.generation}"

    @property
    def name(self) -> str:
        """How logs name it: ``demo worker 0``, its model then its slot, so the
        workers of two models are never confused."""
        return f"{self.model} worker {self.slot}" if self.model else f"worker {self.slot}"

    @property
    def remote(self) -> bool:
        return self.remote_uid is not None

    @property
    def device(self) -> str:
        return self.device_label or self.placement.label

    @property
    def data_identity(self) -> bytes:
        return protocol.data_identity(self.uid)

    @property
    def control_identity(self) -> bytes:
        return protocol.control_identity(self.uid)

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def free_credit(self) -> int:
        if self.state is not State.READY or self.role is not Role.CURRENT:
            return 0
        return self.capacity - len(self.inflight)

    @property
    def weights(self) -> dict[str, Any] | None:
        """READY's word on the weights: whether this process maps the host's one copy, why not."""
        found = (self.signature or {}).get("weights")
        return found if isinstance(found, dict) else None

    def shown_state(self) -> str:
        if self.state is State.READY and self.inflight:
            return BUSY
        return self.state.value

    def heartbeat_age(self, now: float | None = None) -> float | None:
        if self.last_seen is None:
            return None
        return (time.monotonic() if now is None else now) - self.last_seen

    def take_memory(self, message: protocol.MemoryFields) -> None:
        """Copy the live memory figures a READY or HEARTBEAT carries."""
        self.rss_bytes = message.get("rss_bytes", self.rss_bytes)
        self.pss_bytes = message.get("pss_bytes")
        self.private_bytes = message.get("private_bytes")
        self.shared_pss_bytes = message.get("shared_pss_bytes")
        self.cuda_allocated_bytes = message.get("cuda_allocated_bytes")
        self.cuda_reserved_bytes = message.get("cuda_reserved_bytes")

    def take_hello(self, message: protocol.HelloHeader) -> bool:
        """Who the process says it is; True when a remote worker that was gone is back."""
        self.pid = message.get("pid", self.pid)
        self.host = message.get("host")
        if self.remote and self.state in (State.STOPPED, State.RESTARTING):
            self.state = State.STARTING
            return True
        return False

    def take_ready(self, message: protocol.ReadyHeader) -> None:
        """The worker loaded its model: what READY says of it, and a clean slate."""
        self.state = State.READY
        self.take_memory(message)
        self.load_seconds = message.get("load_s")
        self.capacity = max(1, int(message.get("capacity", 1)))
        self.input_shape = message.get("input_shape")
        self.input_dtype = message.get("input_dtype")
        self.signature = message.get("signature")
        self.boot_failures = self.crash_boots = 0
        self.last_error = None

    def new_generation(self, generation: int) -> None:
        """Forget the previous process; its messages no longer match ``uid``."""
        self.generation = generation
        self.process = None
        self.pid = None
        self.state = State.STARTING
        self.last_seen = None
        self.lost_when_ready = False
        self.verdict = None
        self.rss_bytes = self.cuda_allocated_bytes = self.cuda_reserved_bytes = None
        self.pss_bytes = self.private_bytes = self.shared_pss_bytes = None
        self.batches_seen = {}
        self.thread_passes_seen = {}
        self.threads = None
        self.waits_seen = []
        self.wait_sum_seen = 0.0


class Pool:
    """All worker records, looked up by wire identity.

    ``workers`` holds the local slots (index == slot), ``remote`` the workers that
    joined over --bind; both serve. ``handovers`` holds the workers of a hand-over:
    the successors and retiring workers of a recycle, a reload or a scale-down,
    alive, but not (or no longer) serving.
    """

    REMOTE_IDS_FROM = 1000

    def __init__(self, placements: list[Placement], model: str = "") -> None:
        self.model = model
        self._generations = itertools.count()
        self.workers = [WorkerRecord(p, next(self._generations), model=model) for p in placements]
        self.remote: list[WorkerRecord] = []
        self.handovers: list[WorkerRecord] = []
        self._by_uid = {w.uid: w for w in self.workers}
        self._remote_ids = itertools.count(self.REMOTE_IDS_FROM)
        # True once any worker has been ready: from then on load failures are
        # replaced with backoff instead of stopping the server.
        self.ever_ready = False
        self.draining = False
        # Forward passes by batch rows, pool-wide since the gateway started:
        # the workers' cumulative HEARTBEAT ``batches``, summed across restarts.
        self.batch_rows: dict[int, int] = {}
        # Forward passes by intra-op threads (elastic cores), pool-wide, the same way.
        self.thread_passes: dict[int, int] = {}
        # Requests by seconds waited in a worker before their forward pass
        # (buckets of protocol.WAIT_BUCKETS_S, then the overflow), pool-wide.
        self.wait_counts = [0] * (len(protocol.WAIT_BUCKETS_S) + 1)
        self.wait_sum = 0.0

    def take_heartbeat(self, worker: WorkerRecord, beat: protocol.HeartbeatHeader) -> None:
        """What a HEARTBEAT reports: the worker's memory, and the batches, waits and
        thread counts it ran since the last one, into the pool's totals."""
        worker.take_memory(beat)
        self.take_batches(worker, beat.get("batches"))
        self.take_waits(worker, beat.get("waits"))
        self.take_threads(worker, beat.get("threads"), beat.get("thread_passes"))

    def take_batches(self, worker: WorkerRecord, reported: Any) -> None:
        """Add what ``worker`` ran since its last heartbeat to ``batch_rows``.

        ``reported`` is a HEARTBEAT's ``batches``: ``[[rows, count], ...]``,
        cumulative for the worker's process. A count that went down means the
        process started over (a remote worker that came back), so it counts whole.
        """
        add_increases(reported, worker.batches_seen, self.batch_rows)

    def take_threads(self, worker: WorkerRecord, threads: Any, reported: Any) -> None:
        """A HEARTBEAT's ``threads`` (its last pass) and ``thread_passes`` (as ``batches``)."""
        if isinstance(threads, int) and threads > 0:
            worker.threads = threads
        add_increases(reported, worker.thread_passes_seen, self.thread_passes)

    def take_waits(self, worker: WorkerRecord, reported: Any) -> None:
        """Add what ``worker`` reported in a HEARTBEAT's ``waits`` since its last one.

        Like ``batches`` the counts are cumulative for the worker's process;
        counts that went down mean a new process, whose counts add whole.
        """
        if not isinstance(reported, dict):
            return
        counts, total = reported.get("counts"), reported.get("sum")
        if (
            not isinstance(counts, list)
            or len(counts) != len(self.wait_counts)
            or not all(isinstance(n, int) and n >= 0 for n in counts)
            or not isinstance(total, int | float)
        ):
            return
        seen = worker.waits_seen or [0] * len(counts)
        restarted = any(n < before for n, before in zip(counts, seen, strict=True))
        for index, n in enumerate(counts):
            self.wait_counts[index] += n if restarted else n - seen[index]
        self.wait_sum += total if restarted else max(0.0, total - worker.wait_sum_seen)
        worker.waits_seen = list(counts)
        worker.wait_sum_seen = float(total)

    def next_generation(self) -> int:
        """Generations are unique across the pool, so a uid is never reused."""
        return next(self._generations)

    def add_remote(self, uid: str, hello: protocol.HelloHeader, now: float) -> WorkerRecord:
        """The record of a remote worker that said hello over --bind, joined to the pool."""
        cores = tuple(int(c) for c in hello.get("cores") or ())
        worker = WorkerRecord(
            Placement(self.next_remote_id(), "remote", None, cores),
            remote_uid=uid,
            model=self.model,
            link=REMOTE,
            device_label=str(hello.get("device", "cpu")),
            last_seen=now,
            spawned_at=now,
        )
        self.remote.append(worker)
        self.register(worker)
        return worker

    def next_remote_id(self) -> int:
        return next(self._remote_ids)

    def register(self, worker: WorkerRecord) -> None:
        self._by_uid[worker.uid] = worker

    def forget(self, worker: WorkerRecord) -> None:
        if self._by_uid.get(worker.uid) is worker:
            del self._by_uid[worker.uid]

    def by_uid(self, uid: str) -> WorkerRecord | None:
        return self._by_uid.get(uid)

    def serving(self) -> list[WorkerRecord]:
        """Every record that takes requests when ready: local slots, then remote workers."""
        return [*self.workers, *self.remote] if self.remote else self.workers

    def all_records(self) -> list[WorkerRecord]:
        return [*self.workers, *self.remote, *self.handovers]

    def ready_workers(self) -> list[WorkerRecord]:
        return [w for w in self.serving() if w.ready]

    def coming(self) -> list[WorkerRecord]:
        """Serving records not ready yet but on their way, so a request may wait for them.

        A worker booting (starting, loading) or dead with its replacement due,
        unless it is in a crash loop (it died by itself while booting, again and
        again): a request would only wait for the next death. None while the
        pool drains.
        """
        if self.draining:
            return []
        return [
            w for w in self.serving() if w.state in _ON_THE_WAY and not crash_looping(w.crash_boots)
        ]

    def crash_looping(self) -> list[WorkerRecord]:
        """Serving records that keep dying before they are ready (and are restarted)."""
        return [
            w for w in self.serving() if w.state in _ON_THE_WAY and crash_looping(w.crash_boots)
        ]

    def pick(self) -> WorkerRecord | None:
        """The ready worker with the least outstanding work that still has credit."""
        best: WorkerRecord | None = None
        for worker in self.serving():
            if worker.free_credit > 0 and (
                best is None or len(worker.inflight) < len(best.inflight)
            ):
                best = worker
        return best


def add_increases(reported: Any, seen: dict[int, int], total: dict[int, int]) -> None:
    """Add to ``total`` what a cumulative ``[[key, count], ...]`` grew by since ``seen``.

    A count that went down means the process started over (a remote worker
    that came back), so it counts whole. Malformed pairs are skipped.
    """
    if not isinstance(reported, list):
        return
    for pair in reported:
        if not (isinstance(pair, list) and len(pair) == 2):
            continue
        key, count = pair
        if not (isinstance(key, int) and isinstance(count, int)) or key < 1 or count < 0:
            continue
        before = seen.get(key, 0)
        added = count - before if count >= before else count
        if added:
            total[key] = total.get(key, 0) + added
        seen[key] = count

"""Keeps the pool's processes alive: spawn, listen, reap, replace, stop.

One method per supervisory act, as in gunicorn's arbiter. The local slots
follow a wanted state: how many slots there should be (``scale_to``, the
TTIN/TTOU signals) and, for a slot whose worker died, when it may be
refilled (after its backoff). Those only record what is wanted; one
reconcile step (:meth:`Supervisor.reconcile`, gunicorn's ``manage_workers``)
compares it with what exists and fixes the difference: it adds and retires
slots, and spawns a worker for every slot that wants one. So a slot scaled
away while it waited out a backoff is simply no longer wanted, and nothing
is spawned for it. Replacing a live worker (recycling, a reload) is wanted
state too: a slot marked for recycling, or a pending reload. The same step
starts their successors, hands each slot over once its successor is ready,
and drops successors that died (see :mod:`gateway.pool.succession`).

A worker that exits is noticed at once by reaping; one that goes silent is
noticed when its heartbeats stop, asked to stop, then killed. Either way the requests it held
are settled by the dispatcher and its slot is refilled with exponential
backoff. A worker whose model cannot load before the pool has ever served is
not restarted: when every slot has failed that way the server stops with the
reason (``fatal``), instead of serving a pool that can never become ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import zmq

from gateway.pool import deaths
from gateway.pool.deaths import Death, OomCounter, describe_exit, from_status
from gateway.pool.dispatch import Dispatcher
from gateway.pool.placement import choose_gpus, format_cores, place_another
from gateway.pool.process import ProcessHandle, Spawner, WorkerProcess, command_line
from gateway.pool.succession import Succession
from gateway.pool.transport import Transport
from gateway.pool.workers import DeathCause, Pool, Role, State, WorkerRecord
from shared import protocol
from shared.config import PoolSettings
from shared.errors import SHUTTING_DOWN, Conflict, Unavailable
from shared.restarts import backoff_s, given_up

log = logging.getLogger("torchpool.supervisor")

STOP_GRACE_S = 5.0  # after STOP/SIGTERM, before SIGKILL


class Supervisor:
    def __init__(
        self,
        settings: PoolSettings,
        pool: Pool,
        transport: Transport,
        dispatcher: Dispatcher,
        on_fatal: Callable[[str], None],
        spawner: Spawner = WorkerProcess.spawn,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        taken: Callable[[], Sequence[int]] = tuple,
        oom: OomCounter | None = None,
    ) -> None:
        self._settings = settings
        # Tells a SIGKILL from the kernel's OOM killer from any other sender's.
        self._oom = oom if oom is not None else OomCounter()
        # Cores other models' workers hold, avoided when scaling up.
        self._taken = taken
        # The wanted state the reconcile step makes true: the number of local slots.
        self._wanted = len(pool.workers)
        self._reconciling = asyncio.Lock()
        self._pool = pool
        self._transport = transport
        self._dispatcher = dispatcher
        self._on_fatal = on_fatal
        # Seams for fast tests: how a worker process starts, and what time it is.
        self._spawner = spawner
        self._clock = clock
        self._sleep = sleep
        # Successors wanted and booting: recycled slots, a pending reload.
        self._succession = Succession(pool, self, clock)
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gpus = choose_gpus(settings.device)
        self._drain_started: float | None = None
        self._hurry = asyncio.Event()
        # Observer for metrics: called once per unplanned worker death with its
        # cause (a DeathCause's value, or deaths.py's), the cause /health and the log give.
        self.on_death: Callable[[str], None] | None = None
        # Observer: called when a serving worker becomes ready.
        self.on_ready: Callable[[WorkerRecord], None] | None = None

    @property
    def settings(self) -> PoolSettings:
        """The settings new workers are started with (a reload changes them)."""
        return self._settings

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        await self.reconcile()
        self._background(self._keep_alive())

    async def stop(self) -> None:
        """Drain in-flight requests, then stop every worker: ask, wait, kill, reap."""
        self.begin_drain()
        await self.drain()
        # Remote workers are services of their own: they outlive this gateway and
        # re-announce themselves to the next one, so only our children are stopped.
        records = [w for w in self._pool.all_records() if not w.remote]
        for worker in records:
            self._send_control(worker, {"t": protocol.STOP, "reason": "shutdown"})
        await asyncio.gather(*(self._stop_process(w) for w in records), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def begin_drain(self, hurry: bool = False) -> None:
        """Stop: refuse new work and spawn nothing from now on; a second call with
        ``hurry`` cuts the drain short.

        From here on a worker that exits (on its own stop signal, say, when the
        whole process group was signalled) is part of the stop: it is not an
        error and it is not replaced.
        """
        if not self._stopping:
            self._stopping = True
            self._succession.fail_reload(Unavailable("the server is shutting down"))
        self._pool.draining = True
        if self._drain_started is None:
            self._drain_started = time.monotonic()
        # Nothing is coming any more: requests queued for a booting worker get 503 now.
        self._dispatcher.give_up_waiting()
        if hurry and not self._hurry.is_set():
            self._hurry.set()
            # Nobody is left waiting: every open request is answered now, so the
            # HTTP server has no connection to wait for and shuts down at once.
            self._dispatcher.abandon_all(Unavailable(f"{SHUTTING_DOWN} now"))

    async def drain(self) -> None:
        """Wait for in-flight work, at most what is left of --drain-timeout-s."""
        started = self._drain_started or time.monotonic()
        remaining = max(0.0, self._settings.drain_timeout_s - (time.monotonic() - started))
        idle = asyncio.ensure_future(self._dispatcher.wait_idle(remaining))
        hurry = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait({idle, hurry}, return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
        if not (idle.done() and idle.result()):
            idle.cancel()
            if self._dispatcher.outstanding:
                log.warning(
                    "model %s: stopping with %d requests still in flight",
                    self._pool.model,
                    self._dispatcher.outstanding,
                )

    # --- acts -------------------------------------------------------------------

    async def spawn(self, worker: WorkerRecord, settings: PoolSettings | None = None) -> None:
        placement = worker.placement
        argv, env = command_line(
            settings or self._settings, placement, self._transport.endpoint, worker.uid, worker.slot
        )
        worker.state = State.STARTING
        self._pool.register(worker)
        process = await self._spawner(argv, env, label=worker.name)
        worker.process = process
        worker.pid = process.pid
        worker.spawned_at = self._clock()
        if self._stopping or worker.state is State.STOPPED:
            # Let go of while it started (a shutdown, an abandoned reload): no
            # record will serve from it, so it stops now; reaping still ends it.
            self._background(process.stop(STOP_GRACE_S))
        log.info(
            "%s spawned: pid %d, %s, cores %s",
            worker.name, process.pid, placement.label, format_cores(placement.cores),
        )  # fmt: skip
        self._background(self._reap(worker, process))

    async def _reap(self, worker: WorkerRecord, process: ProcessHandle) -> None:
        code = await process.wait()
        if worker.process is not process:
            return  # a process we had already given up on
        worker.exit_code = code
        death = self._death_of(worker, process, code)
        worker.last_death = death
        if worker.role is Role.RETIRING:
            self._retired(worker, death)
            return
        if worker.role is Role.SUCCESSOR:
            self._successor_died(worker, process, death)
            return
        if self._stopping or worker.state is State.STOPPED:
            worker.state = State.STOPPED
            log.info("worker %d (pid %d) stopped: %s", worker.slot, process.pid, death.reason)
            self._dispatcher.worker_lost(worker, death.reason)  # what it held, if anything
            return
        was_ready = worker.state is State.READY or worker.lost_when_ready
        if worker.verdict is None:  # else declare_lost() counted it
            self._count_death(death.cause)
        # Out of rotation first, so the retries below cannot land on it again, nor
        # on another worker that died with it and is not reaped yet.
        worker.state = State.RESTARTING
        self._out_of_rotation_if_dead()
        self._dispatcher.worker_lost(worker, death.reason)
        if worker.last_error is None or was_ready:
            worker.last_error = deaths.death_note(worker, process, death.reason)
        log.error("%s (pid %d) %s", worker.name, process.pid, death.reason)
        if not was_ready and death.cause != DeathCause.KILLED_OUTSIDE:
            worker.crash_boots += 1
        self._replace(worker, code, was_ready)
        # A crash loop or a failed slot: requests waiting for this worker stop waiting.
        self._dispatcher.give_up_waiting(f"worker {worker.slot} {death.reason}")

    def _death_of(self, worker: WorkerRecord, process: ProcessHandle, code: int) -> Death:
        """How ``worker``'s process ended, from what the supervisor decided and its status."""
        now = time.time()
        if worker.verdict is not None:  # killed as hung, retired, let go of
            return Death(worker.verdict.cause, worker.verdict.reason, code, now)
        if self._stopping:
            return Death("shutdown", f"stopped with the gateway ({describe_exit(code)})", code, now)
        oom = code == -signal.SIGKILL and not process.killed_by_us and self._oom.new_kills()
        cause, reason = from_status(code, process.killed_by_us, oom)
        return Death(cause, reason, code, now)

    def _out_of_rotation_if_dead(self) -> None:
        """Take ready local workers whose process has exited, but is not reaped yet,
        out of rotation, so no retry goes to them (several killed at once)."""
        for other in self._pool.serving():
            process = other.process
            if other.ready and process is not None and process.exit_status() is not None:
                other.state = State.RESTARTING
                other.lost_when_ready = True  # its own reaping settles and replaces it

    def _replace(self, worker: WorkerRecord, code: int, was_ready: bool) -> None:
        if not was_ready:
            worker.boot_failures += 1
        if code == protocol.EXIT_LOAD_FAILED and not self._pool.ever_ready:
            worker.state = State.FAILED
            self._check_fatal()
            return
        if given_up(worker.boot_failures):
            worker.state = State.FAILED
            log.error(
                "%s failed %d boots in a row; not restarting it: %s",
                worker.name, worker.boot_failures, worker.last_error,
            )  # fmt: skip
            if not self._pool.ever_ready:
                self._check_fatal()
            return
        worker.state = State.RESTARTING
        delay = backoff_s(worker.boot_failures)
        if delay:
            log.info("restarting %s in %.1fs", worker.name, delay)
        worker.respawn_at = self._clock() + delay
        self._background(self._reconcile_after(delay))

    async def _reconcile_after(self, delay: float) -> None:
        if delay:
            await self._sleep(delay)
        await self.reconcile()

    async def reconcile(self) -> None:
        """Make the local slots what is wanted; the one place that adds, removes and refills.

        Grows or shrinks the slot list to the wanted count (removed slots drain
        before they stop); drops successors that died or whose slot is gone,
        hands slots over to ready successors and starts the ones wanted
        (:class:`gateway.pool.succession.Succession`); starts the next generation
        of every slot whose backoff is over, and spawns every slot that has no
        process yet. Passes run one at a time; any event may ask for one, and
        a pass with nothing to do changes nothing.
        """
        async with self._reconciling:
            if self._stopping:
                return
            self._scale()
            self._succession.reconcile()
            await self._succession.start(self._settings)
            await self._refill()
            self._dispatcher.give_up_waiting()  # a slot scaled away may have been coming

    def _scale(self) -> None:
        """Add or retire slots until there are as many as wanted."""
        workers = self._pool.workers
        while len(workers) < self._wanted:
            slot = len(workers)
            placement = place_another(
                [w.placement for w in workers],
                slot,
                self._gpus,
                self._settings.cores_per_worker,
                taken=self._taken(),
                model=self._pool.model,
            )
            added = WorkerRecord(
                placement, generation=self._pool.next_generation(), model=self._pool.model
            )
            workers.append(added)
            log.info("scaling up: %s", added.name)
        while len(workers) > self._wanted:
            worker = workers.pop()
            log.info("scaling down: draining %s", worker.name)
            self.retire(worker, "scaled down", cause="scale_down")

    async def _refill(self) -> None:
        """Spawn every slot that wants a process: new, or dead with its backoff over."""
        now = self._clock()
        for worker in list(self._pool.workers):
            if self._stopping:
                return
            if worker.state is State.RESTARTING and worker.respawn_at is not None:
                if now < worker.respawn_at:
                    # Not yet (a timer may fire a little early): look again then.
                    self._background(self._reconcile_after(worker.respawn_at - now))
                    continue
                worker.respawn_at = None
                worker.restarts += 1
                self._pool.forget(worker)
                worker.new_generation(self._pool.next_generation())
            if worker.state is State.STARTING and worker.process is None:
                await self.spawn(worker)

    def declare_lost(
        self, worker: WorkerRecord, how: str, cause: DeathCause, retry: bool = True
    ) -> None:
        """Give up on a live but silent, hung or unreachable worker: settle, stop, reap.

        ``cause`` is what the metrics count it as. ``retry`` False answers its requests 503.
        """
        if worker.state in (State.RESTARTING, State.FAILED, State.STOPPED):
            return
        process = worker.process
        if process is not None and process.exit_status() is not None:
            # Already dead (unreachable because it died), only not reaped yet: its
            # reaping, a moment away, says how it died.
            worker.lost_when_ready = worker.state is State.READY
            worker.state = State.RESTARTING
            return
        self._count_death(cause)
        worker.verdict = Death(cause, how)
        log.error("%s %s; replacing it", worker.name, how)
        # Read by _reap, which sees RESTARTING: a silent ready worker did boot.
        worker.lost_when_ready = worker.state is State.READY
        worker.state = State.RESTARTING
        worker.last_error = f"worker {worker.slot} {how}"
        self._dispatcher.worker_lost(worker, how, retry)
        if worker.remote:
            # Nothing to reap or respawn here: the worker re-announces itself
            # (hello, ready) if it comes back, and then serves again.
            worker.state = State.STOPPED
            worker.last_death = Death(cause, how, None, time.time())
        elif process is not None:
            # A silent worker cannot be asked (a stopped or GIL-bound process never
            # acts on SIGTERM) and its requests are settled already: kill it, as
            # gunicorn does. Reaping (in _reap) then refills the slot.
            process.kill()
        self._dispatcher.give_up_waiting(f"worker {worker.slot} {how}")

    def _check_fatal(self) -> None:
        workers = self._pool.workers
        if workers and all(w.state is State.FAILED for w in workers):
            self._on_fatal(workers[0].last_error or "no worker could load the model")

    async def _stop_process(self, worker: WorkerRecord) -> None:
        process = worker.process
        if process is None or not process.is_alive():
            worker.state = State.STOPPED if worker.state is not State.FAILED else worker.state
            return
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), STOP_GRACE_S)
        except asyncio.TimeoutError:
            await process.stop(STOP_GRACE_S)
        if worker.state is not State.FAILED:
            worker.state = State.STOPPED

    async def _keep_alive(self) -> None:
        """Beat to every worker and retire the ones that went silent."""
        interval = self._settings.heartbeat_s
        allowed = interval * self._settings.heartbeat_liveness
        while True:  # until stop() cancels it: a worker can hang while the pool drains
            now = self._clock()
            for worker in self._pool.all_records():
                if worker.state not in (State.STARTING, State.LOADING, State.READY):
                    continue
                self._send_control(worker, {"t": protocol.BEAT})
                verdict = deaths.silence(worker, now, allowed)
                if verdict is not None:
                    self.declare_lost(worker, *verdict)
            await self._sleep(interval)

    # --- messages from workers ---------------------------------------------------

    def on_control(self, worker: WorkerRecord, message: dict[str, Any]) -> None:
        """One control message. Typed by its ``t``; each value is still checked
        or coerced where it is used, since a remote worker may be of any make."""
        kind = message["t"]
        worker.last_seen = self._clock()
        if kind == protocol.HEARTBEAT:
            beat = cast(protocol.HeartbeatHeader, message)
            self._pool.take_heartbeat(worker, beat)
            self._check_batch_time(worker, beat.get("batch_s"))
            self.check_recycle(worker)
        elif kind == protocol.HELLO:
            if worker.take_hello(cast(protocol.HelloHeader, message)):
                log.info("remote %s (%s) is back", worker.name, worker.uid)
        elif kind == protocol.LOADING:
            worker.state = State.LOADING
        elif kind == protocol.READY:
            self._on_ready(worker, cast(protocol.ReadyHeader, message))
        elif kind == protocol.ERROR:
            worker.last_error = str(cast(protocol.ErrorHeader, message).get("message"))
            log.error("%s: %s", worker.name, worker.last_error)
        elif kind == protocol.BYE:
            reason = cast(protocol.ByeHeader, message).get("reason")
            log.info("%s says bye: %s", worker.name, reason)

    def _check_batch_time(self, worker: WorkerRecord, batch_s: object) -> None:
        """Kill a worker whose forward pass has run past --max-batch-seconds.

        A forward pass that never returns (a model stuck in a Python loop) keeps
        the heartbeats flowing from the control thread, so silence never shows
        it. Its requests are answered 503, not retried: they would hang the next
        worker too; each one has had its 504 by now anyway with the default limit.
        """
        limit = self._settings.batch_limit_s
        if limit is None or not isinstance(batch_s, int | float) or batch_s <= limit:
            return
        how = f"was killed: its batch ran longer than {limit:g} s (--max-batch-seconds)"
        self.declare_lost(worker, how, DeathCause.BATCH_TIMEOUT, retry=False)

    def _on_ready(self, worker: WorkerRecord, message: protocol.ReadyHeader) -> None:
        if worker.state not in (State.STARTING, State.LOADING):
            return
        worker.take_ready(message)
        self._pool.ever_ready = True
        log.info("%s ready in %.2fs", worker.name, worker.load_seconds or 0.0)
        if worker.role is Role.SUCCESSOR:
            self._reconcile_soon()  # which hands its slot over
            return
        self.put_in_service(worker)

    def admit_remote(self, uid: str, message: dict[str, Any]) -> WorkerRecord | None:
        """A worker we did not spawn says hello over --bind (CURVE already checked it)."""
        hello = cast(protocol.HelloHeader, message)
        if self._stopping or hello.get("v") != protocol.VERSION:
            log.warning("refusing remote worker %r: protocol %r", uid, hello.get("v"))
            return None
        worker = self._pool.add_remote(uid, hello, self._clock())
        log.info("remote %s joined: %s from %s", worker.name, uid, hello.get("host"))
        return worker

    # --- scaling -----------------------------------------------------------------

    @property
    def target_workers(self) -> int:
        return self._wanted

    async def scale_to(self, count: int) -> None:
        """Resize the local pool: new slots boot in the background; removed ones drain."""
        if self._stopping:
            return
        if self._succession.reloading:
            raise Conflict("the model is being reloaded; scale it when that is done")
        self._wanted = count
        await self.reconcile()

    def scale_by(self, delta: int) -> None:
        """SIGTTIN (+1) / SIGTTOU (-1), as gunicorn does."""
        if not self._succession.reloading:
            self._wanted = max(0, self._wanted + delta)
            self._reconcile_soon()

    # --- replacing live workers ---------------------------------------------------

    def check_recycle(self, worker: WorkerRecord) -> None:
        """Ask for a successor to ``worker`` if it passed its request count or memory ceiling."""
        if not self._stopping and self._succession.want_successor(worker, self._settings):
            self._reconcile_soon()

    async def reload(self, settings: PoolSettings | None = None) -> None:
        """Replace every local worker with one that loads the model again (``settings``).

        Each successor boots on its predecessor's placement while the old
        workers serve; only when every successor is ready do they take over,
        and then each old worker finishes what it holds and stops, so nothing
        is dropped. If a successor dies before it is ready, the others are
        stopped, the old workers go on serving, and ModelLoadError says why.
        This only asks for the reload; the reconcile step carries it out.
        """
        if self._stopping:
            raise Unavailable(SHUTTING_DOWN)
        reload = self._succession.begin_reload(settings or self._settings)
        self._reconcile_soon()
        try:
            await reload.outcome
        except asyncio.CancelledError:
            self._reconcile_soon()  # which stops its successors
            raise

    # The acts succession asks for (gateway.pool.succession.Acts).

    def retire(
        self, worker: WorkerRecord, reason: str, drain: bool = True, cause: str = "recycle"
    ) -> None:
        """Take ``worker`` out of service and stop it: after what it holds, with ``drain``.

        ``cause`` (recycle, reload, scale_down) and ``reason`` are what its end is
        logged as, and shown as its slot's last_death.
        """
        if worker in self._pool.handovers:
            self._pool.handovers.remove(worker)
        worker.role = Role.RETIRING
        worker.verdict = Death(cause, reason)
        if not drain:
            worker.state = State.STOPPED
        process = worker.process
        if process is None or not process.is_alive():
            self._pool.forget(worker)
            worker.state = State.STOPPED
            return
        self._pool.handovers.append(worker)  # until it is reaped
        self._send_control(worker, {"t": protocol.STOP, "reason": reason})
        # A worker answers all it holds before it acts on STOP; it gets no new work.
        self._background(self._drain_then_stop(process) if drain else process.stop(STOP_GRACE_S))

    def put_in_service(self, worker: WorkerRecord) -> None:
        """``worker`` is ready in its slot: give it the waiting work, tell the observer."""
        self._dispatcher.pump()
        if self.on_ready is not None:
            self.on_ready(worker)

    def adopt(self, settings: PoolSettings) -> None:
        self._settings = settings

    async def _drain_then_stop(self, process: ProcessHandle) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), self._settings.drain_timeout_s)
        except asyncio.TimeoutError:
            await process.stop(STOP_GRACE_S)

    def _retired(self, worker: WorkerRecord, death: Death) -> None:
        """A retiring worker exited (drained, or let go of)."""
        if worker in self._pool.handovers:
            self._pool.handovers.remove(worker)
        self._pool.forget(worker)
        worker.state = State.STOPPED
        log.info(
            "worker %d (pid %s) stopped: %s (%s)",
            worker.slot, worker.pid, death.reason, describe_exit(death.exit_code or 0),
        )  # fmt: skip
        slots = self._pool.workers
        if worker.slot < len(slots) and slots[worker.slot] is not worker:
            # Its successor serves the slot now: the slot's last death is this one.
            slots[worker.slot].last_death = death
        self._dispatcher.worker_lost(worker, death.reason)  # normally holds nothing by now

    def _successor_died(self, worker: WorkerRecord, process: ProcessHandle, death: Death) -> None:
        """A successor died before it took over: record why; reconcile lets it go."""
        self._pool.forget(worker)
        self._dispatcher.worker_lost(worker, death.reason)  # holds nothing: it never served
        if self._stopping:
            worker.state = State.STOPPED
            return
        if worker.verdict is None:  # else declare_lost() counted it, and said why
            self._count_death(death.cause)
            worker.last_error = deaths.death_note(worker, process, death.reason)
        worker.state = State.STOPPED
        self._reconcile_soon()  # which decides what its death means, and logs it

    # --- helpers ---------------------------------------------------------------

    def _count_death(self, cause: str) -> None:
        """One unplanned death, by a DeathCause (a str enum) or its value."""
        if self.on_death is not None:
            self.on_death(DeathCause(cause).value)

    def _send_control(
        self, worker: WorkerRecord, message: protocol.BeatHeader | protocol.StopHeader
    ) -> None:
        # An unconnected control socket (still booting, or gone) is not an error here.
        with contextlib.suppress(zmq.ZMQError):
            self._transport.send(worker.control_identity, [protocol.pack(message)], worker.link)

    def _reconcile_soon(self) -> None:
        self._background(self.reconcile())

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

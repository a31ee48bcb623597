"""The audit writer of an event loop's requests: one thread writes the records of concurrent requests together.

A request's record written from a worker thread of its own (`anyio.to_thread`) costs the event loop a
thread hop per request: waking a worker, then the worker waking the loop; the records of requests that
end together then queue for the log's lock one by one. `AuditLog.append_async` queues the record
here instead. This log's one writer thread takes everything queued (up to `MAX_BATCH`, and
`MAX_BATCH_CHARS` of retained text), writes it in
one group commit (`AuditLog._flush`, under the log's lock, as a thread's `append` does), runs each
record's `then` (what follows a written record: metrics, quotas, alarms), and wakes each waiting
loop once for the whole batch. Every caller still returns only once its own record is committed, or
raises what kept it out (`AuditUnavailable`: the request gets a 503). Measured (32 tasks on one
loop, SQLite): 200-260 us of CPU per record through a worker thread each, 52-59 us through this one.

The thread starts with the first record and stops when the log closes or is collected (it holds the
log only weakly between batches).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from typing import Any

from . import heads
from .heads import AuditUnavailable

log = logging.getLogger("codemoat.audit")
#: how long closing the log waits for the writer to write what is queued
STOP_WAIT_S = 30.0


class RecordWriter:
    """One daemon thread per audit log, started by the first `submit`."""

    def __init__(self, audit_log: Any):
        self._ref = weakref.ref(audit_log)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._at_exit = False
        weakref.finalize(audit_log, self._queue.put, None)  # a collected log stops its thread

    def submit(self, pending: Any) -> None:
        """Queue `pending` (an `audit.pending.Pending` with its loop's future in `fut`)."""
        with self._start_lock:  # with `stop`: a record is queued before the stop its thread reads, or for a new thread
            if self._thread is None:
                t = threading.Thread(target=_run, args=(self._ref, self._queue), name="audit-writer", daemon=True)
                t.start()
                self._thread = t
                if not self._at_exit:  # a process that ends while records are queued writes and signs them first
                    atexit.register(_close_at_exit, self._ref)
                    self._at_exit = True
            self._queue.put(pending)

    def stop(self) -> None:
        """Write what is queued, then end the thread (a later `submit` starts another). Returns once the
        thread has written it (at most `STOP_WAIT_S`): the log's close signs the head after this."""
        with self._start_lock:
            t, self._thread = self._thread, None
            if t is not None:
                self._queue.put(None)
        if t is not None and t is not threading.current_thread():
            t.join(STOP_WAIT_S)
            if t.is_alive():
                log.error("audit writer: records still queued after %s s at close", STOP_WAIT_S)


def _close_at_exit(ref: weakref.ref) -> None:
    lg = ref()
    if lg is not None and lg._writer._thread is not None:
        try:
            lg.close()  # the writer writes what is queued, then the head is signed
        except Exception as e:  # noqa: BLE001 - at exit, the database may be gone; the next writer signs
            log.warning("could not close the audit log at exit: %s", e)


def _run(ref: weakref.ref, q: queue.SimpleQueue) -> None:
    stop = False
    while not stop:
        first = q.get()
        if first is None:
            return
        batch, chars = [first], heads.text_chars(first.row)
        while not heads.batch_full(len(batch), chars):
            try:
                w = q.get_nowait()
            except queue.Empty:
                break
            if w is None:
                stop = True
                break
            batch.append(w)
            chars += heads.text_chars(w.row)
        lg = ref()
        try:
            if lg is None:
                raise AuditUnavailable("audit log cannot be written: it was closed")
            _write(lg, batch)
        except BaseException as e:  # noqa: BLE001 - this thread must outlive anything: every waiter gets an answer
            if not isinstance(e, AuditUnavailable):
                log.exception("audit writer")
                e = AuditUnavailable(f"audit log cannot be written: {type(e).__name__}")
            for w in batch:
                if w.error is None and not w.done:
                    w.error = e
        del lg  # no strong reference while waiting
        _settle(batch)
        # nor through the last batch: a record's `then` holds the request's trust layer, which holds the log
        first = w = batch = None


def _write(lg: Any, batch: list) -> None:
    with lg._lock:
        lg._flush(batch)
    for w in batch:
        if w.error is not None:
            continue
        lg._write_also(w)
        if w.then is not None:
            try:
                w.then()
            except Exception:  # the record is written: what follows it must not fail the request
                log.exception("after audit record %d", w.seq)


def _settle(batch: list) -> None:
    """Each waiting loop wakes once, for all of its records in `batch`."""
    by_loop: dict[Any, list] = {}
    for w in batch:
        by_loop.setdefault(w.fut.get_loop(), []).append(w)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass


def _resolve(items: list) -> None:
    for w in items:
        if w.fut.done():  # its task was cancelled (the record is written all the same)
            continue
        if w.error is not None:
            w.fut.set_exception(w.error)
        else:
            w.fut.set_result(w.seq)

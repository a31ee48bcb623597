"""`update apply` hands what it installed to the `codemoat serve`s running on this home.

    $CODEMOAT_HOME/run/serve-<pid>.sock      one per running serve (AF_UNIX stream, mode 0600, folder 0700)
    $CODEMOAT_HOME/run/vaultd-<pid>.sock     a running `codemoat vaultd`: it passes an adapter's new version
                                             on to the `serve --vault`s connected to it (which swap it in,
                                             fetching it from vaultd) and answers `{"ok": true, "swapped":
                                             false, "relayed": N}`; a new model version it verifies and
                                             takes in first (cli.vaultd_cmd.swap_installed_model)

Each serve listens on its own socket while it runs (`update.handoff`, on by default); after an
install, `update apply` connects to every socket there, one after the other, sends one JSON line
`{"op": "swap", "channel": "model" | "adapter:NAME", "progress": true}` and reads JSON lines back until
the answer: `{"ok": true, "swapped": true, ...}` (serving it now), `{"ok": true, "swapped": false,
"reason": ...}` (this serve does not serve that channel: nothing to do) or `{"ok": false, "error": ...}`
(the swap failed; the serve rolled the store back unless another serve's check had passed it). A
connection closed (or reset) without an answer is `{"ok": false, "lost": true, ...}`: the serve ended
during the swap (killed, out of memory) and checked nothing, so `update apply` records the version
failed unless another serve's check passed it (store.fail with only_pending). A socket nobody listens on
any more (a serve that was killed) is removed. No socket: nothing is running, the bundle serves from the
next start.

Progress: with `"progress": true` in the request, the serve sends `{"progress": "waiting" | "swapping",
"stage": STAGE, "channel": ..., "seconds": N, "stage_seconds": M}` at once and every `PROGRESS_S` while
the swap runs (a large model's load takes minutes), from a thread of its own. STAGE is where the swap is
(`stage()`: "waiting" for another swap here, "swapping", then the swap's own steps: serve.swapping says
"loading", "confirming", "recording"); a line vouches that the swap moves, so once one stage has lasted
`STALL_S` the serve sends no more lines until the stage changes (and logs why). `update apply` gives up
on a serve that has sent no whole line for `SILENCE_S`: one that had sent progress is hung or stopped
mid-swap and is recorded lost, as a closed connection (`"silent": true`); one that sent nothing at all is
reported without touching the store (a hung listener, or a serve older than this change, which ignores
`progress` and answers once its swap is done, recording its outcome in the store itself). So a stopped
serve delays the serves after it by `SILENCE_S`, and one whose swap hangs (a load that never returns) by
`STALL_S + SILENCE_S`, not the `SWAP_S` a whole swap may take. Older peers: `stage` and `stage_seconds`
are new fields an older `update apply` ignores (it reads any line with `progress` and no `ok` as progress),
and a line without them from an older serve is read as before. A request without `progress` (an older
`update apply`) gets the one answer line, as before.

Who may ask is the kernel's word (SO_PEERCRED): the serve's own uid, or root. That account owns the
update store and the machine key already, so the socket grants nothing it could not do by
restarting the server; it is not reachable from the network, unlike an admin route.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import paths
from ..unixsock import accept, close_listener, peer_cred

log = logging.getLogger("codemoat.updates")

MAX_LINE = 64 * 1024
#: seconds between a serve's progress lines during a swap
PROGRESS_S = 5.0
#: seconds `update apply` waits for a serve's next line: twelve progress intervals, so a serve whose
#: progress thread is merely slow for a while (a loaded machine, a model paging in) is not given up on
SILENCE_S = 60.0
#: seconds one serve's whole swap may take while it keeps sending progress (a large model from a slow disk)
SWAP_S = 900.0
#: seconds one stage of a swap may last before its serve stops vouching for it. The longest stage is the
#: load and health check of the new engine, one stage (engines.loader reports nothing finer): a 250 MB
#: GGUF takes seconds, a multi-GB model from a slow disk a minute or two, so five minutes is over twice
#: the slowest expected (`update.swap_stall_s` sets it). A hung swap then holds `update apply` STALL_S + SILENCE_S
#: (6 minutes), not SWAP_S. Waiting for another swap of the same serve to end (stage "waiting") is not a stall:
#: that swap is vouched for, or given up on, by its own `apply`; SWAP_S bounds the wait
STALL_S = 300.0
STALL_ENV = "CODEMOAT_UPDATE_STALL_S"  # tests only (needs PYTEST_CURRENT_TEST): a serve's STALL_S, shortened
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the final NUL


_swapping = threading.local()  # the progress state of the swap running on this thread (`Listener._swap`)


def stage(name: str) -> None:
    """The hand-off swap running on this thread has reached `name` (its progress lines say so, and its
    `STALL_S` starts again); nothing outside a hand-off (an admin route's swap)."""
    state = getattr(_swapping, "state", None)
    if state is not None:
        state["at"] = (name, time.monotonic())  # one assignment: the line thread never reads one without the other


def _stall_s(configured: float = STALL_S) -> float:
    """`configured` (STALL_S, or `update.swap_stall_s`), or in a test the seconds its serve was started with in
    STALL_ENV."""
    if os.environ.get("PYTEST_CURRENT_TEST") and STALL_ENV in os.environ:
        try:
            return float(os.environ[STALL_ENV])
        except ValueError:
            pass
    return configured


def run_dir(home: Path | None = None) -> Path:
    return (home or paths.home()) / "run"


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf:
        got = conn.recv(4096)
        if not got:
            break
        buf += got
        if len(buf) > MAX_LINE:
            raise ValueError("message too long")
    return buf.split(b"\n", 1)[0]


class _Lines:
    """JSON lines read off a connection, each whole within a time limit (`next`)."""

    def __init__(self, conn: socket.socket):
        self.conn, self.buf = conn, b""

    def next(self, limit: float) -> bytes | None:
        """The next line (None: the peer closed); TimeoutError when no whole line came within `limit` s (bytes
        trickling in do not count: the limit is on the line)."""
        due = time.monotonic() + limit
        while b"\n" not in self.buf:
            left = due - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.conn.settimeout(left)
            got = self.conn.recv(4096)
            if not got:
                return None
            self.buf += got
            if len(self.buf) > MAX_LINE and b"\n" not in self.buf:
                raise ValueError("message too long")
        line, self.buf = self.buf.split(b"\n", 1)
        return line


class Listener:
    """serve's side: answers `swap` requests from its own account with `handle(channel) -> dict`
    (which raises a CodemoatError when the swap failed), one swap at a time, with progress lines while it
    runs when the request asks for them."""

    def __init__(
        self,
        handle: Callable[[str], dict[str, Any]],
        home: Path | None = None,
        role: str = "serve",
        progress_s: float = PROGRESS_S,
        stall_s: float | None = None,
    ):
        self.handle = handle
        self.path = run_dir(home) / f"{role}-{os.getpid()}.sock"
        self.progress_s, self.stall_s = progress_s, _stall_s(STALL_S if stall_s is None else stall_s)
        self._sock: socket.socket | None = None
        self._busy = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> Listener | None:
        """Listen; None (logged) when the path is too long for a unix socket."""
        d = self.path.parent
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        if len(os.fsencode(self.path)) > _SUN_PATH_MAX:
            log.warning("%s is too long for a unix socket: `update apply` will not swap this server's model", self.path)
            return None
        self.path.unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # never connectable by others, not even for an instant
        try:
            s.bind(str(self.path))
        finally:
            os.umask(old)
        s.listen(4)
        self._sock = s
        threading.Thread(target=self._accept_loop, name="update-handoff", daemon=True).start()
        return self

    def _accept_loop(self) -> None:
        sock = self._sock
        while sock is not None and (conn := accept(sock, self._stop, "update hand-off")) is not None:
            threading.Thread(target=self._serve, args=(conn,), name="update-handoff-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                uid = peer_cred(conn)[1]
                # the request is read first, even from a caller who is then refused: closing on its unread
                # line resets the connection, and it would see a broken pipe instead of the reason
                conn.settimeout(10)
                try:
                    msg = json.loads(_read_line(conn))
                except (ValueError, RecursionError):
                    msg = None
                conn.settimeout(None)
                if uid not in (0, os.getuid()):
                    log.warning("update hand-off: refused uid %d (only this server's account or root)", uid)
                    answer: dict[str, Any] = {"ok": False, "error": f"uid {uid} may not swap this server's model"}
                else:
                    chan = msg.get("channel") if isinstance(msg, dict) and msg.get("op") == "swap" else None
                    if not isinstance(chan, str) or not (chan == "model" or chan.startswith("adapter:")):
                        answer = {"ok": False, "error": 'unknown request (expected {"op": "swap", "channel": CHANNEL})'}
                    elif msg.get("progress") is True:
                        answer = self._swap_telling(conn, chan)
                    else:  # an `update apply` from before progress lines: the answer alone
                        answer = self._swap(chan, _progress("waiting"))
                answer["pid"] = os.getpid()
                conn.settimeout(10)  # a caller that reads nothing more does not hold this thread
                conn.sendall(json.dumps(answer, default=str).encode() + b"\n")
            except OSError:
                return

    def _swap(self, chan: str, state: dict[str, Any]) -> dict[str, Any]:
        """`handle(chan)` once no other swap runs here, as the answer's fields; `state` says where it is
        (the `stage` that `handle` reports with `stage()`, on this thread, after "waiting" and "swapping")."""
        from ..errors import CodemoatError

        with self._busy:
            _swapping.state = state
            stage("swapping")
            try:
                return {"ok": True, **self.handle(chan)}
            except CodemoatError as e:
                return {"ok": False, "error": str(e)}
            except Exception as e:  # never a traceback to the caller; the log has it
                log.exception("update hand-off of %s failed", chan)
                return {"ok": False, "error": f"the swap failed: {type(e).__name__}"}
            finally:
                _swapping.state = None

    def _swap_telling(self, conn: socket.socket, chan: str) -> dict[str, Any]:
        """The swap run in a thread of its own while this one sends a progress line at once and every
        `progress_s`, while its stage has lasted no more than `stall_s`. A caller gone meanwhile ends the
        lines, not the swap (which records its outcome itself)."""
        state = _progress("waiting")
        done = threading.Event()

        def work() -> None:
            try:
                state["answer"] = self._swap(chan, state)
            finally:
                done.set()

        threading.Thread(target=work, name="update-handoff-swap", daemon=True).start()
        started, telling, stalled = time.monotonic(), True, None
        conn.settimeout(10)  # a caller that stops reading does not hold the lines for good
        while True:
            now, (at, since) = time.monotonic(), state["at"]
            if at != "waiting" and now - since > self.stall_s:  # no progress: silence, which `update apply` gives up on
                if stalled != (at, since):
                    stalled = (at, since)
                    log.warning(
                        "update hand-off of %s: its swap has been at stage %r for %.0f s; no more progress lines "
                        "until it moves (`update apply` stops waiting for this server)",
                        chan,
                        at,
                        now - since,
                    )
            elif telling:
                line = {
                    "progress": "waiting" if at == "waiting" else "swapping",  # what older applies know
                    "stage": at,
                    "channel": chan,
                    "seconds": round(now - started),
                    "stage_seconds": round(now - since),
                }
                try:
                    conn.sendall(json.dumps(line).encode() + b"\n")
                except OSError:
                    telling = False
            if done.wait(self.progress_s):
                break
        return state.get("answer") or {"ok": False, "error": "the swap failed"}

    def close(self) -> None:
        self._stop.set()
        s, self._sock = self._sock, None
        if s is not None:
            close_listener(s)  # its accept thread ends (it held the app)
            self.path.unlink(missing_ok=True)


def _progress(at: str) -> dict[str, Any]:
    """A swap's progress state, shared by its thread (`stage`) and the thread sending its lines."""
    return {"at": (at, time.monotonic())}


def hand_over(
    channel: str,
    home: Path | None = None,
    timeout: float = SWAP_S,
    pids: set[int] | None = None,
    silence: float = SILENCE_S,
) -> list[dict[str, Any]]:
    """Ask every serve running on this home (or those of `pids`) to serve `channel`'s installed version; one
    answer each (`pid`, `ok`, `swapped`, `error` or `reason`). An empty list: no serve is running. Each serve
    is given up on after `silence` s without a line, or `timeout` s in all (the module's docstring)."""
    d = run_dir(home)
    out: list[dict[str, Any]] = []
    for p in sorted([*d.glob("serve-*.sock"), *d.glob("vaultd-*.sock")]) if d.is_dir() else []:
        if pids is not None and _pid_of(p) not in pids:
            continue
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(5)
            s.connect(str(p))
        except (ConnectionRefusedError, FileNotFoundError):
            s.close()
            try:
                p.unlink(missing_ok=True)  # its serve is gone
            except OSError:  # a folder of that name (unlink raised, and the serves after it were never asked)
                pass
            continue
        except OSError as e:
            s.close()
            out.append({"ok": False, "pid": None, "error": f"cannot reach the server at {p}: {e.strerror or e}"})
            continue
        with s:
            answer = _exchange(s, p, channel, timeout, silence)
        if answer is None:
            answer = {"ok": False, "lost": True, "error": f"the server at {p} closed the connection without an answer"}
        elif not isinstance(answer, dict):
            answer = {"ok": False, "error": f"the server at {p} answered something else than a JSON object"}
        answer.setdefault("pid", _pid_of(p))
        out.append(answer)
    return out


def _exchange(s: socket.socket, p: Path, channel: str, timeout: float, silence: float) -> dict[str, Any] | None:
    """One serve's answer to a swap request, its progress lines read past; None when it closed without one."""
    due = time.monotonic() + timeout
    spoke = False  # it sent progress: a serve of this protocol, whose silence means it is hung or stopped
    at = ""  # the stage its last progress line named (a serve before stages names none)
    lines = _Lines(s)
    try:
        s.settimeout(silence)
        s.sendall(json.dumps({"op": "swap", "channel": channel, "progress": True}).encode() + b"\n")
        while True:
            left = due - time.monotonic()
            if left <= 0:
                return {
                    "ok": False,
                    "error": f"the server at {p} is still swapping after {timeout:g} s; it records the outcome in "
                    "the update store itself (`codemoat update list`)",
                }
            try:
                line = lines.next(min(silence, left))
            except TimeoutError:
                if due - time.monotonic() <= 0:
                    continue
                if spoke:
                    return {
                        "ok": False,
                        "lost": True,
                        "silent": True,
                        "error": f"the server at {p} said nothing for {silence:g} s during the swap (hung or stopped{at})",
                    }
                return {
                    "ok": False,
                    "error": f"no answer from the server at {p} in {silence:g} s (a hung server, or one older than "
                    "this codemoat, which answers once its swap is done and records it in the update store itself: "
                    "`codemoat update list`)",
                }
            if line is None:
                return None  # it ended before it answered
            msg = json.loads(line)
            if isinstance(msg, dict) and "progress" in msg and "ok" not in msg:
                spoke = True
                if isinstance(msg.get("stage"), str):
                    at = f", at stage {msg['stage'][:40]!r}"
                continue
            return msg
    except (ConnectionResetError, BrokenPipeError):
        return None  # it ended before it answered
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested past the decoder's limit
        return {"ok": False, "error": f"no answer from the server at {p}: {e}"}


def _pid_of(p: Path) -> int | None:
    try:
        return int(p.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return None

"""A resident trainer: one long-lived process on a GPU host that keeps the base model loaded (and
compiled: `compile=True`, the CLI's default on CUDA) and trains subject after subject in it.

A new process per subject pays, each time, Python's and CUDA's start, the base model's load, the
pinning of the checkpoints' host buffers and, with `compile_unet`, the compile. The resident trainer
pays them once: each job reuses the kept `TrainerSession` when its base model (path, sizes, mtimes)
and the configuration that shapes the models are the same, and starts from the base weights, a fresh
optimizer state and LR schedule, exactly as a new process would (`tests/test_resident.py` trains a
subject both ways and compares the losses). Anything else builds a new session in the same process.
Because a kept session pays a compile once, the resident trainer compiles the UNet and text encoder
inside the captured step whatever the config says (speed only, see `TrainerSession`; torch.compile's
artifacts are also cached on disk, so a restarted trainer compiles from the cache).

The flow does not change: its training task computes the training key, the work folder and the
inputs as it always does, and sends them here instead of training in its own process
(`ATELIER_TRAINER_SOCKET`). Lineage, the ledger and isolation are the flow's, as before.

Protocol: a Unix socket (mode 0600; its folder is the workspace's), one JSON object per line; no
object in either direction is ever deserialised as code. The client sends
`{"token", "config", "inputs", "step_budget"}` (or `{"token", "ping": true}`); the trainer answers
`started`, then `step` and `loss` events, then `done` with the result, or `error` with what went
wrong, why and the fix. The token (a 0600 file beside the socket, written at start) must match: the
socket's permissions are the first lock, the token the second. Paths are confined: the work and
output folders must lie under the runs folder the trainer was started with, the class latents under
its priors cache. A client that goes away stops its job at the next step (the last checkpoint
stays, so a rerun resumes); jobs run one at a time, in the order they connect.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import socket
import stat
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from atelier.kernel.errors import AtelierError, ConfigError, ServiceUnavailable

PROTOCOL = "1"
MAX_REQUEST_BYTES = 1 << 20


class TrainerUnavailable(ServiceUnavailable):
    """The resident trainer's socket is missing, refuses or stopped answering."""


class TrainerRefused(AtelierError):
    """The resident trainer refused or failed the job (its message says why)."""


class _ClientGone(Exception):
    pass


def token_path(sock: Path) -> Path:
    return Path(f"{sock}.token")


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.chmod(path, 0o600)


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


class ResidentTrainer:
    """Serves training jobs on `sock` (see the module docstring). `runs_root` and `latents_root`
    confine where jobs may write."""

    def __init__(self, sock: Path, runs_root: Path, latents_root: Path, log: Callable[[str], None] = print, compile: bool = False) -> None:
        self.sock, self.runs_root, self.latents_root, self.log = Path(sock), Path(runs_root), Path(latents_root), log
        self.compile = compile  # torch.compile inside the captured step (CUDA): paid by the first job of each session
        self.session = None
        self.jobs = 0
        self.token = ""
        self.finishing: dict[socket.socket, threading.Thread] = {}  # jobs whose pipeline is still being written

    def serve(self, max_jobs: int | None = None) -> None:
        """Listen until interrupted (or until `max_jobs` jobs were handled)."""
        if len(os.fsencode(self.sock)) > 100:  # AF_UNIX paths end at 108 bytes
            raise ConfigError(
                str(self.sock), "is too long for a Unix socket (over 100 bytes)", "choose a shorter ATELIER_TRAINER_SOCKET path"
            )
        self.sock.parent.mkdir(parents=True, exist_ok=True)
        if self.sock.exists() or self.sock.is_symlink():
            if not stat.S_ISSOCK(self.sock.lstat().st_mode):
                raise ConfigError(str(self.sock), "exists and is not a socket", "choose another ATELIER_TRAINER_SOCKET path")
            if _answers(self.sock):
                raise ConfigError(str(self.sock), "another resident trainer is serving it", "stop that one first, or choose another path")
            self.sock.unlink()
        self.token = secrets.token_urlsafe(32)
        _write_secret(token_path(self.sock), self.token)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: only this user connects
        try:
            server.bind(str(self.sock))
        finally:
            os.umask(old)
        server.listen(16)
        self.log(f"resident trainer listening on {self.sock}")
        try:
            handled = 0
            while max_jobs is None or handled < max_jobs:
                conn, _ = server.accept()
                try:
                    if self._handle(conn):
                        handled += 1
                finally:
                    if conn not in self.finishing:
                        conn.close()
        finally:
            for thread in list(self.finishing.values()):
                thread.join()
            server.close()
            self.sock.unlink(missing_ok=True)
            token_path(self.sock).unlink(missing_ok=True)
            if self.session is not None:
                self.session.close()

    def _handle(self, conn: socket.socket) -> bool:
        """One connection: a ping or a job. Returns whether it was a job."""
        self._conn = conn
        reader = conn.makefile("rb")
        line = reader.readline(MAX_REQUEST_BYTES + 1)

        def send(event: dict) -> None:
            try:
                conn.sendall((json.dumps(event) + "\n").encode())
            except OSError as exc:
                raise _ClientGone() from exc

        try:
            if len(line) > MAX_REQUEST_BYTES:
                raise ConfigError("resident trainer request", f"is over {MAX_REQUEST_BYTES} bytes", "send one JSON object per line")
            try:
                request = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ConfigError("resident trainer request", f"is not JSON ({exc})", "send one JSON object per line") from None
            if not isinstance(request, dict):
                raise ConfigError("resident trainer request", "is not a JSON object", "send one JSON object per line")
            if not hmac.compare_digest(str(request.get("token", "")).encode(), self.token.encode()):
                raise TrainerRefused(
                    "resident trainer request", "has no valid token", f"read the token from {token_path(self.sock)} (0600, same user)"
                )
            if request.get("ping"):
                send({"event": "pong", "protocol": PROTOCOL, "jobs": self.jobs, "session": self.session is not None, "pid": os.getpid()})
                return False
            self._job(request, send)
            return True
        except _ClientGone:
            self.log("the client went away; its job stopped (the last checkpoint stays)")
            return True
        except AtelierError as exc:
            with contextlib.suppress(_ClientGone, OSError):
                send({"event": "error", "kind": type(exc).__name__, "item": exc.item, "problem": exc.problem, "fix": exc.fix})
            return False
        except Exception as exc:  # noqa: BLE001 - the job's failure is the client's error; the trainer goes on
            self.log(f"job failed: {exc.__class__.__name__}: {exc}")
            with contextlib.suppress(_ClientGone, OSError):
                send(
                    {
                        "event": "error",
                        "kind": "TrainerRefused",
                        "item": "training job",
                        "problem": f"failed in the resident trainer: {exc.__class__.__name__}: {str(exc)[:500]}",
                        "fix": "read the trainer's log; a rerun resumes from the last checkpoint",
                    }
                )
            return True

    def _job(self, request: dict, send: Callable[[dict], None]) -> None:
        from pydantic import ValidationError

        from atelier.kernel.errors import schema_problems
        from atelier.models.dreambooth.config import TrainConfig
        from atelier.models.dreambooth.trainer import TrainerSession

        try:
            cfg = TrainConfig(**dict(request.get("config") or {}))
        except ValidationError as exc:
            problem, fix = schema_problems(exc.errors())
            raise ConfigError("training config", problem, fix) from None
        inputs = self._inputs(request.get("inputs"))
        budget = request.get("step_budget")
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise ConfigError("step_budget", f"is {budget!r}", "send a positive integer or null")
        t0 = time.perf_counter()
        reused = self.session is not None and self.session.reusable_for(cfg, inputs.base_model)
        if not reused:
            self._drop_session()
            self.session = TrainerSession(cfg, inputs.base_model, keep=True, compile=self.compile)
            if self.session.compiled:
                self.log("this session compiles the UNet in its first steps (once; later jobs of the session reuse it)")
        send({"event": "started", "session_reused": reused, "load_seconds": time.perf_counter() - t0})
        self.jobs += 1
        self.log(f"job {self.jobs}: {inputs.work_dir} ({'kept session' if reused else 'new session'})")
        try:
            result = self.session.run(
                cfg,
                inputs,
                on_progress=lambda step, total, loss, lr: send({"event": "loss", "step": step, "total": total, "loss": loss, "lr": lr}),
                step_budget=budget,
                on_step=lambda step, total: send({"event": "step", "step": step, "total": total}),
                defer_save=True,
            )
        except BaseException:
            self._drop_session()  # a run stopped half-way leaves no state for the next job to inherit
            raise
        done = {
            "finished": result.finished,
            "step": result.step,
            "losses": result.losses,
            "output_dir": str(result.output_dir) if result.output_dir else None,
            "resumed_from": result.resumed_from,
            "seconds": result.seconds,
            "validation_dirs": [str(p) for p in result.validation_dirs],
            "timings": result.timings,
        }
        if result.pending is None:
            send({"event": "done", "result": done})
            return
        # the next subject trains while this one's pipeline is written; its client hears "done" when it is whole
        conn = self._conn

        def finish() -> None:
            try:
                result.pending.wait()
                send({"event": "done", "result": {**done, "timings": result.timings}})
            except _ClientGone:
                pass
            except AtelierError as exc:
                with contextlib.suppress(_ClientGone, OSError):
                    send({"event": "error", "kind": type(exc).__name__, "item": exc.item, "problem": exc.problem, "fix": exc.fix})
            except Exception as exc:  # noqa: BLE001
                with contextlib.suppress(_ClientGone, OSError):
                    send(
                        {
                            "event": "error",
                            "kind": "TrainerRefused",
                            "item": str(inputs.output_dir),
                            "problem": f"could not be written: {exc}",
                            "fix": "free some space or fix the folder, then rerun",
                        }
                    )
            finally:
                conn.close()
                self.finishing.pop(conn, None)

        thread = threading.Thread(target=finish, name="job-finisher", daemon=True)
        self.finishing[conn] = thread
        thread.start()

    def _inputs(self, raw):
        from atelier.models.dreambooth.trainer import TrainInputs

        if not isinstance(raw, dict):
            raise ConfigError("training inputs", "are missing", "send base_model, instance_dir, class_noun, work_dir and output_dir")
        try:
            inputs = TrainInputs(
                Path(raw["base_model"]),
                Path(raw["instance_dir"]),
                str(raw["class_noun"]),
                Path(raw["work_dir"]),
                Path(raw["output_dir"]),
                Path(raw["class_dir"]) if raw.get("class_dir") else None,
                Path(raw["class_latents"]) if raw.get("class_latents") else None,
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                "training inputs", f"lack {exc}", "send base_model, instance_dir, class_noun, work_dir and output_dir"
            ) from None
        for name in ("work_dir", "output_dir"):
            if not _inside(getattr(inputs, name), self.runs_root):
                raise TrainerRefused(
                    f"{name} {getattr(inputs, name)}",
                    f"is outside the runs folder {self.runs_root}",
                    "train into the workspace's runs folder",
                )
        if inputs.class_latents is not None and not _inside(inputs.class_latents, self.latents_root):
            raise TrainerRefused(
                f"class_latents {inputs.class_latents}",
                f"is outside the priors cache {self.latents_root}",
                "keep latents in the priors cache",
            )
        for name in ("base_model", "instance_dir", "class_dir"):
            value = getattr(inputs, name)
            if value is not None and not value.is_dir():
                raise ConfigError(f"{name} {value}", "is not a folder on the trainer's host", "share the workspace with the trainer's host")
        return inputs

    def _drop_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


def _answers(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(sock))
            return True
        except OSError:
            return False


def _connect(sock: Path) -> tuple[socket.socket, str]:
    fix = "start it on the GPU host with `atelier trainer serve`, or unset ATELIER_TRAINER_SOCKET to train in the flow's own process"
    try:
        token = token_path(sock).read_text().strip()
    except OSError:
        raise TrainerUnavailable(f"resident trainer {sock}", "is not running (no token file beside the socket)", fix) from None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(sock))
    except OSError as exc:
        conn.close()
        raise TrainerUnavailable(f"resident trainer {sock}", f"refused the connection ({exc.strerror or exc})", fix) from None
    return conn, token


def _events(conn: socket.socket, sock: Path):
    reader = conn.makefile("rb")
    for raw in reader:
        try:
            event = json.loads(raw)
        except ValueError:
            raise TrainerUnavailable(
                f"resident trainer {sock}", f"answered something that is not JSON: {raw[:80]!r}", "restart it"
            ) from None
        if not isinstance(event, dict) or "event" not in event:
            raise TrainerUnavailable(f"resident trainer {sock}", f"answered an unknown message: {str(event)[:80]}", "restart it")
        yield event
    raise TrainerUnavailable(
        f"resident trainer {sock}", "closed the connection before the job ended", "read its log, then rerun: training resumes"
    )


def _raise(event: dict) -> None:
    kinds = {"ConfigError": ConfigError, "TrainerUnavailable": TrainerUnavailable}
    cls = kinds.get(str(event.get("kind")), TrainerRefused)
    raise cls(str(event.get("item", "training job")), str(event.get("problem", "failed")), str(event.get("fix", "read the trainer's log")))


def ping(sock: Path) -> dict:
    """The trainer's state (`jobs`, whether a session is loaded, its pid); TrainerUnavailable if it does not answer."""
    conn, token = _connect(Path(sock))
    with conn:
        conn.sendall((json.dumps({"token": token, "ping": True}) + "\n").encode())
        for event in _events(conn, Path(sock)):
            if event["event"] == "error":
                _raise(event)
            return event
    return {}


def train_resident(
    sock: Path,
    cfg,
    inputs,
    on_progress: Callable[[int, int, float, float], None] | None = None,
    step_budget: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_start: Callable[[dict], None] | None = None,
):
    """`trainer.train`, run by the resident trainer at `sock`: same arguments, same result."""
    from atelier.models.dreambooth.trainer import TrainResult

    sock = Path(sock)
    conn, token = _connect(sock)
    request = {
        "token": token,
        "protocol": PROTOCOL,
        "config": cfg.model_dump(mode="json"),
        "inputs": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(inputs).items()},
        "step_budget": step_budget,
    }
    with conn:
        conn.sendall((json.dumps(request) + "\n").encode())
        for event in _events(conn, sock):
            kind = event["event"]
            if kind == "started" and on_start:
                on_start(event)
            elif kind == "step" and on_step:
                on_step(int(event["step"]), int(event["total"]))
            elif kind == "loss" and on_progress:
                on_progress(int(event["step"]), int(event["total"]), float(event["loss"]), float(event["lr"]))
            elif kind == "error":
                _raise(event)
            elif kind == "done":
                r = event["result"]
                return TrainResult(
                    bool(r["finished"]),
                    int(r["step"]),
                    [float(x) for x in r["losses"]],
                    Path(r["output_dir"]) if r.get("output_dir") else None,
                    r.get("resumed_from"),
                    float(r.get("seconds", 0.0)),
                    [Path(p) for p in r.get("validation_dirs", [])],
                    {k: float(v) for k, v in (r.get("timings") or {}).items()},
                )
    raise TrainerUnavailable(f"resident trainer {sock}", "ended the job without a result", "read its log, then rerun")

"""A resident per-site worker, so that a deployed message does not pay for starting JAX.

Flower 1.42 starts a fresh `flwr-clientapp` process for every message: each one would import
JAX (5-6 s), load the base model and tokenizer and compile the site's programs again. The
worker opens the site once (`SiteRunner.open`) and answers frames on a Unix domain socket
`<site-dir>/worker.sock` (under the temp dir when that path is too long; `socket_path`); the
ClientApp only forwards the frame to it (`call_worker`), which
needs neither JAX nor the project's array code, so it stays a thin, fast shim.

    python -m fedjax_lora.deploy.worker --site-dir=/abs/site

The socket carries one request at a time. A frame is encoded as repeated
[u32 name length][name][u64 value length][value] (big-endian); a request is
[u64 length][encoded frame] and a reply is [u8 status][u64 length][payload], where status 0
carries the reply frame and status 1 the site's error text. `<site-dir>/worker.ready` appears
only once the site is open and the socket listens, so a harness can wait for it. SIGTERM (or
SIGINT) removes the socket and the marker and exits 0.

This module imports nothing heavy at import time; `fedjax_lora.deploy.site` (and with it JAX)
is imported only by the worker process itself.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback

from fedjax_lora.errors import DeployError

Frame = dict[str, bytes]  # the same shape as `wire.Frame`; wire itself imports JAX

SOCKET_NAME = "worker.sock"
READY_NAME = "worker.ready"
# sun_path holds 108 bytes with the terminating NUL: a longer path cannot be bound at all
_MAX_SOCKET_PATH = 107
_NAME_LEN = struct.Struct("!I")
_VALUE_LEN = struct.Struct("!Q")
_STATUS = struct.Struct("!B")
_OK, _FAILED = 0, 1


class WorkerUnavailable(DeployError):
  """No resident worker answers at a site (socket missing, refused or stale): the caller may
  open the site in-process instead. Errors from a worker that did answer are plain
  DeployErrors, and must not be retried elsewhere (the site may have done the work)."""


def socket_path(site_dir: str) -> str:
  """`<site-dir>/worker.sock`, or, when that is longer than a Unix socket path may be,
  `<tmp>/fedjax-worker-<hash of the site dir>.sock` (both sides derive the same name)."""
  site_dir = os.path.abspath(site_dir)
  path = os.path.join(site_dir, SOCKET_NAME)
  if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
    return path
  digest = hashlib.sha256(os.fsencode(site_dir)).hexdigest()[:24]
  short = os.path.join(tempfile.gettempdir(), f"fedjax-worker-{digest}.sock")
  if len(os.fsencode(short)) > _MAX_SOCKET_PATH:
    raise DeployError(f"site dir {site_dir}: no worker socket path fits the {_MAX_SOCKET_PATH}-"
                      "byte Unix socket limit; use a shorter site dir or TMPDIR")
  return short


def ready_path(site_dir: str) -> str:
  return os.path.join(os.path.abspath(site_dir), READY_NAME)


def encode_frame(frame: Frame) -> bytes:
  """The frame as repeated [u32 name length][name][u64 value length][value]."""
  parts = []
  for name, value in frame.items():
    raw_name = name.encode()
    value = bytes(value)
    parts += [_NAME_LEN.pack(len(raw_name)), raw_name, _VALUE_LEN.pack(len(value)), value]
  return b"".join(parts)


def decode_frame(data: bytes, where: str) -> Frame:
  """Inverse of `encode_frame`; DeployError naming `where` if the bytes are cut or bad."""
  frame, pos, view = {}, 0, memoryview(data)
  try:
    while pos < len(data):
      (name_len,) = _NAME_LEN.unpack_from(view, pos)
      pos += _NAME_LEN.size
      name = bytes(view[pos:pos + name_len]).decode()
      pos += name_len
      (value_len,) = _VALUE_LEN.unpack_from(view, pos)
      pos += _VALUE_LEN.size
      if pos + value_len > len(data):
        raise ValueError(f"field {name!r} is cut short")
      frame[name] = bytes(view[pos:pos + value_len])
      pos += value_len
  except (struct.error, UnicodeDecodeError, ValueError) as e:
    raise DeployError(f"{where}: malformed frame at byte {pos} ({e})") from None
  return frame


def _recv_exact(conn: socket.socket, n: int, where: str) -> bytes:
  buf = bytearray(n)
  view, got = memoryview(buf), 0
  while got < n:
    k = conn.recv_into(view[got:], min(n - got, 1 << 20))
    if k == 0:
      raise DeployError(f"{where}: connection closed after {got} of {n} bytes")
    got += k
  return bytes(buf)


def call_worker(site_dir: str, frame: Frame, timeout: float) -> Frame:
  """Sends `frame` to the site's resident worker and returns its reply frame.

  WorkerUnavailable if no worker listens (socket missing, refused); SiteError with the
  site's error text if the site failed; DeployError if the worker does not answer within
  `timeout` seconds or drops the connection."""
  try:
    path = socket_path(site_dir)
  except DeployError as e:
    raise WorkerUnavailable(str(e)) from None  # no worker can listen there
  if not os.path.exists(path):
    raise WorkerUnavailable(f"site dir {site_dir}: no resident worker (no {path})")
  conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  try:
    conn.settimeout(timeout)
    try:
      conn.connect(path)
    except (ConnectionRefusedError, FileNotFoundError) as e:
      raise WorkerUnavailable(f"site dir {site_dir}: the resident worker at {path} does not "
                              f"answer ({type(e).__name__}); stale socket?") from None
    where = f"resident worker at {path}"
    payload = encode_frame(frame)
    try:
      conn.sendall(_VALUE_LEN.pack(len(payload)) + payload)
      (status,) = _STATUS.unpack(_recv_exact(conn, _STATUS.size, where))
      (length,) = _VALUE_LEN.unpack(_recv_exact(conn, _VALUE_LEN.size, where))
      body = _recv_exact(conn, length, where)
    except socket.timeout:
      raise DeployError(f"{where} did not answer within {timeout:g} s") from None
    except (BrokenPipeError, ConnectionResetError) as e:
      raise DeployError(f"{where} dropped the connection ({type(e).__name__}); did it "
                        "die?") from None
  finally:
    conn.close()
  if status == _OK:
    return decode_frame(body, f"reply of {where}")
  raise SiteError(body.decode(errors="replace"))


class SiteError(DeployError):
  """The site raised while handling a frame; the text names the site dir and the error."""


class _Stop(BaseException):
  """Raised by the SIGTERM/SIGINT handler to leave the serving loop (a BaseException, so that
  no `except Exception` in the site's code swallows it)."""


def _stop(signum, _frame):
  raise _Stop(signal.Signals(signum).name)


def _log(msg: str) -> None:
  print(f"[worker {os.getpid()}] {msg}", file=sys.stderr, flush=True)


def _claim_socket(path: str, site_dir: str) -> None:
  """Removes a socket left by a dead worker; refuses to start beside a live one."""
  if not os.path.exists(path):
    return
  probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  try:
    probe.connect(path)
  except (ConnectionRefusedError, FileNotFoundError):
    os.unlink(path)  # nobody listens: left behind by a killed worker
    return
  finally:
    probe.close()
  raise DeployError(f"site dir {site_dir}: another worker already serves {path}")


def _serve_one(conn: socket.socket, runner, site_dir: str) -> None:
  where = f"request to the worker of {site_dir}"
  if not conn.recv(1, socket.MSG_PEEK):
    return  # closed without a request: another worker probing whether this one is alive
  (length,) = _VALUE_LEN.unpack(_recv_exact(conn, _VALUE_LEN.size, where))
  frame = decode_frame(_recv_exact(conn, length, where), where)
  kind = frame.get("kind", b"?").decode(errors="replace")
  start = time.perf_counter()
  try:
    reply, status = encode_frame(runner.handle(frame)), _OK
  except Exception as e:  # pylint: disable=broad-except
    # the site's failure goes back to the server as its error text; the worker keeps serving
    traceback.print_exc(file=sys.stderr)
    reply, status = f"site {site_dir}: {type(e).__name__}: {e}".encode(), _FAILED
  _log(f"{kind} {time.perf_counter() - start:.2f}s{'' if status == _OK else ' FAILED'}")
  conn.sendall(_STATUS.pack(status) + _VALUE_LEN.pack(len(reply)) + reply)


def serve(site_dir: str) -> None:
  """Opens the site once and answers frames on its socket until SIGTERM/SIGINT."""
  site_dir = os.path.abspath(site_dir)
  if not os.path.isdir(site_dir):
    raise DeployError(f"--site-dir={site_dir}: not a directory")
  path, ready = socket_path(site_dir), ready_path(site_dir)
  _claim_socket(path, site_dir)  # before the slow open: a second worker fails at once
  if os.path.exists(ready):
    os.unlink(ready)  # a marker from an earlier worker must not announce this one
  signal.signal(signal.SIGTERM, _stop)
  signal.signal(signal.SIGINT, _stop)
  listener = None
  try:
    start = time.perf_counter()
    from fedjax_lora.deploy import site  # pylint: disable=import-outside-toplevel
    runner = site.SiteRunner.open(site_dir, _log)
    _log(f"opened {site_dir} in {time.perf_counter() - start:.1f}s")
    _claim_socket(path, site_dir)  # again: the open took a while
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    with open(ready, "w", encoding="utf-8") as f:
      f.write(f"{os.getpid()}\n")
    _log(f"ready on {path}")
    while True:
      conn, _ = listener.accept()
      with conn:
        try:
          _serve_one(conn, runner, site_dir)
        except (DeployError, OSError) as e:
          # a client that went away (its ClientApp was killed) must not take the worker down
          _log(f"request dropped: {e}")
  except _Stop as e:
    _log(f"stopping on {e}")
  finally:
    if listener is not None:
      listener.close()
    # the marker is ours (removed above); the socket only if this worker bound it
    for leftover in (path, ready) if listener is not None else (ready,):
      try:
        os.unlink(leftover)
      except FileNotFoundError:
        pass


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fedjax_lora.deploy.worker",
                                   description="Serve one site's frames on a Unix socket.")
  parser.add_argument("--site-dir", required=True, help="the site directory (holds the socket)")
  args = parser.parse_args(argv)
  try:
    serve(args.site_dir)
  except DeployError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

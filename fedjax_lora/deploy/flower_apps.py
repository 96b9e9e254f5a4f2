"""The Flower 1.42 ServerApp and ClientApp: they carry frames, and nothing else.

All of the federation's logic lives in `server.run_server` (driven through a `wire.Transport`)
and `site.SiteRunner.handle`; Flower is only the road between them, so the same logic runs
unchanged over the in-process loopback. A frame travels as one ConfigRecord of bytes values
named `FRAME_RECORD` in the Message's RecordDict, with message type `MESSAGE_TYPE`.

The ClientApp runs in a fresh `flwr-clientapp` process for every message (1.42 has no
long-lived ClientApp). It hands the frame to the site's resident worker when one listens on
`<site-dir>/worker.sock` (`worker.call_worker`), and otherwise opens the site in-process for
that one message. Hence this module imports neither JAX nor `wire`/`site`/`server` at import
time: on the worker path a message costs the Flower import, not the 5-6 s JAX import.

`flwr run` exits 0 even when the ServerApp fails, so the ServerApp writes
`<workdir>/deploy_status.json` ({"status": "ok"} or {"status": "failed", "error": ...}) for
whoever launched the run to read.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedjax_lora import files
from fedjax_lora.deploy import worker
from fedjax_lora.errors import DeployError

Frame = dict[str, bytes]  # `wire.Frame`; wire imports JAX, which the ClientApp shim avoids

FRAME_RECORD = "fedjax-frame"
# "query" is a plain request in 1.42's ClientApp dispatch; the frame's own "kind" says what
# the site is to do, so one handler serves every frame.
MESSAGE_TYPE = "query"
STATUS_FILE = "deploy_status.json"
# node-config keys given to the SuperNode: `--node-config 'site-dir="/abs/path"'`
SITE_DIR_KEY = "site-dir"
WORKER_TIMEOUT_KEY = "worker-timeout"
DEFAULT_WORKER_TIMEOUT = 24 * 3600.0  # the server's exchange timeout is the real bound
# how often the server asks the SuperLink for replies (Grid.send_and_receive sleeps 3 s)
POLL_INTERVAL = 0.25
TTL_SLACK = 30.0
_ERROR_NAMES = {v: k.lower().replace("_", " ") for k, v in vars(ErrorCode).items()
                if k.isupper() and isinstance(v, int)}


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def frame_to_content(frame: Frame) -> RecordDict:
  """The RecordDict that carries `frame` (one ConfigRecord of bytes values)."""
  return RecordDict({FRAME_RECORD: ConfigRecord({k: bytes(v) for k, v in frame.items()})})


def content_to_frame(content: RecordDict, where: str) -> Frame:
  """The frame inside a message's content; DeployError naming `where` if there is none."""
  record = content.config_records.get(FRAME_RECORD)
  if record is None:
    raise DeployError(f"{where}: message without a '{FRAME_RECORD}' ConfigRecord "
                      f"(records: {sorted(content.keys())})")
  frame = {}
  for name, value in record.items():
    if not isinstance(value, bytes):
      raise DeployError(f"{where}: frame field {name!r} is {type(value).__name__}, not bytes")
    frame[name] = value
  return frame


class FlowerTransport:
  """`wire.Transport` over a Flower 1.42 Grid (inside the ServerApp).

  Replies are matched to nodes by the id of the message they answer, not by arrival order;
  the SuperLink answers for a node it considers gone (an error reply from node 0), and that
  error becomes the node's string like any other."""

  def __init__(self, grid: Grid, *, poll_interval: float = POLL_INTERVAL):
    self._grid = grid
    self._poll = poll_interval
    self._round = 0

  def nodes(self, minimum: int, timeout: float) -> list[int]:
    """The connected nodes, once at least `minimum` are (or all there are at `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
      ids = sorted(self._grid.get_node_ids())
      if len(ids) >= minimum or time.monotonic() >= deadline:
        return ids
      time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

  def exchange(self, messages: dict[int, Frame], timeout: float) -> dict[int, Frame | str]:
    """Sends each node its frame; per node its reply frame or why there is none."""
    self._round += 1
    out: dict[int, Frame | str] = {}
    if not messages:
      return out
    deadline = time.monotonic() + timeout
    nodes = list(messages)
    # the TTL bounds how long an undelivered frame waits for its node (a node that comes back
    # long after the server gave up must not run a stale instruction); the slack keeps the
    # SuperLink's "message expired" error from racing the plain "timeout" at the deadline
    ttl = float(timeout) + TTL_SLACK
    msgs = [Message(frame_to_content(messages[n]), dst_node_id=n, message_type=MESSAGE_TYPE,
                    group_id=str(self._round), ttl=ttl) for n in nodes]
    ids = list(self._grid.push_messages(msgs))
    del msgs
    if len(ids) != len(nodes):  # the grid logs why (e.g. HTTP payload too large)
      return {n: "the SuperLink refused the message (too large?)" for n in nodes}
    pending = {}
    for node, msg_id in zip(nodes, ids):
      if msg_id:
        pending[msg_id] = node
      else:
        out[node] = "the SuperLink did not accept the message"
    while pending:
      for reply in self._grid.pull_messages(list(pending)):
        node = pending.pop(reply.metadata.reply_to_message_id, None)
        if node is not None:
          out[node] = self._reply(node, reply)
      if not pending or time.monotonic() >= deadline:
        break
      time.sleep(min(self._poll, max(0.0, deadline - time.monotonic())))
    for node in pending.values():
      out[node] = "timeout"
    return out

  @staticmethod
  def _reply(node: int, reply: Message) -> Frame | str:
    src = reply.metadata.src_node_id
    if reply.has_error():
      err = reply.error
      if err.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION:
        return err.reason or f"node {node}: the ClientApp failed without a reason"
      return (f"node {node}: {_ERROR_NAMES.get(err.code, f'error {err.code}')}"
              f"{' (reported by the SuperLink)' if src == SUPERLINK_NODE_ID else ''}: "
              f"{err.reason}")
    if src != node:
      return f"node {node}: the reply came from node {src}"
    try:
      return content_to_frame(reply.content, f"reply of node {node}")
    except DeployError as e:
      return str(e)


server_app = ServerApp()


def _write_status(workdir: str, status: dict) -> None:
  files.write_atomic(os.path.join(workdir, STATUS_FILE), json.dumps(status, indent=1) + "\n")


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
  workdir = str(context.run_config.get("workdir", ""))
  if not workdir or not os.path.isabs(workdir) or not os.path.isdir(workdir):
    # no status file can be written without a workdir; the run's log shows this line
    raise DeployError(f"--run-config workdir={workdir!r}: must be an existing absolute "
                      "directory (flwr run --run-config 'workdir=\"/abs/path\"')")
  status_path = os.path.join(workdir, STATUS_FILE)
  if os.path.exists(status_path):
    os.unlink(status_path)  # a status from an earlier run must not speak for this one
  try:
    from fedjax_lora.deploy import server  # pylint: disable=import-outside-toplevel
    server.run_server(workdir, FlowerTransport(grid), _log)
  except BaseException as e:
    traceback.print_exc(file=sys.stderr)
    _write_status(workdir, {"status": "failed", "error": f"{type(e).__name__}: {e}"})
    raise
  _write_status(workdir, {"status": "ok"})


client_app = ClientApp()


def _site_reply(site_dir: str, frame: Frame, worker_timeout: float) -> Frame:
  """The site's reply from its resident worker, or from the site opened in this process."""
  try:
    return worker.call_worker(site_dir, frame, worker_timeout)
  except worker.WorkerUnavailable as e:
    # the fresh-process fallback: one process per message, paying the JAX import and the
    # site's open every time (fine for tests and small runs)
    if os.path.exists(worker.socket_path(site_dir)):
      _log(f"{e}; opening the site in-process")
  from fedjax_lora.deploy import site  # pylint: disable=import-outside-toplevel
  return site.SiteRunner.open(site_dir, _log).handle(frame)


@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
  site_dir = str(context.node_config.get(SITE_DIR_KEY, ""))
  try:
    if not site_dir or not os.path.isabs(site_dir):
      raise DeployError(f"SuperNode --node-config {SITE_DIR_KEY}={site_dir!r}: must be an "
                        f"absolute path (--node-config '{SITE_DIR_KEY}=\"/abs/path\"')")
    timeout = float(context.node_config.get(WORKER_TIMEOUT_KEY, DEFAULT_WORKER_TIMEOUT))
    frame = content_to_frame(msg.content, f"message to site {site_dir}")
    return Message(frame_to_content(_site_reply(site_dir, frame, timeout)), reply_to=msg)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc(file=sys.stderr)
    # the worker's SiteError already reads "site <dir>: <Type>: <message>"
    text = (str(e) if isinstance(e, worker.SiteError)
            else f"site {site_dir}: {type(e).__name__}: {e}")
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=text), reply_to=msg)

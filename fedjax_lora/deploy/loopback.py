"""The deployed protocol in one process: the coordinator and its sites talk through frames
exactly as over Flower, without the network.

Tests compare it with the simulator (same numbers) and with the Flower deployment (same
bytes); `launch.deploy_local --warm` runs it to fill the JAX compile cache the SuperNodes
read. A `tamper` hook sees every reply before the coordinator does (what an attacker on
the wire could do: replay, drop, alter).
"""

from __future__ import annotations

from typing import Callable

from fedjax_lora.deploy import wire


class Loopback:
  """A `wire.Transport` over in-process site runners (anything with `handle(frame)`)."""

  def __init__(self, runners: dict[int, object],
               tamper: Callable[[int, wire.Frame, wire.Frame | str], wire.Frame | str] | None
               = None):
    self.runners = dict(runners)
    self.tamper = tamper
    self.down: dict[int, list[wire.Frame]] = {n: [] for n in runners}
    self.up: dict[int, list[wire.Frame | str]] = {n: [] for n in runners}
    self.dead: set[int] = set()  # nodes that stopped answering (a killed SuperNode)

  def nodes(self, minimum: int, timeout: float) -> list[int]:
    return sorted(n for n in self.runners if n not in self.dead)

  def exchange(self, messages: dict[int, wire.Frame], timeout: float
               ) -> dict[int, wire.Frame | str]:
    replies = {}
    for node, frame in messages.items():
      self.down.setdefault(node, []).append(frame)
      if node in self.dead or node not in self.runners:
        replies[node] = "timeout"
        continue
      sent = {k: bytes(v) for k, v in frame.items()}  # what the wire carries: bytes only
      try:
        reply = self.runners[node].handle(sent)
        reply = {k: bytes(v) for k, v in reply.items()}
      except Exception as e:  # noqa: BLE001 - a site's failure is its absence, reported
        reply = f"site error: {type(e).__name__}: {e}"
      if self.tamper is not None:
        reply = self.tamper(node, frame, reply)
      self.up.setdefault(node, []).append(reply)
      replies[node] = reply
    return replies

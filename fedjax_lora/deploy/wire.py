"""The one encoding every deployed message uses, whatever carries it (Flower or the loopback).

A frame is a flat {name: bytes} map: "kind" (what the message asks or answers), "meta" (a
JSON object of plain values) and one entry per array tree, serialized by
`security.identity.tree_bytes` (sorted paths, dtype and shape headers, little-endian data),
so a tree decodes to exactly the numbers that were sent and hashes the same on both sides
(adapters are float32; a bfloat16 leaf would come back as raw 2-byte void). The Flower apps
put a frame in one ConfigRecord; the loopback passes it as is. Nothing else crosses between
a site and the server.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Protocol

import jax
import numpy as np

from fedjax_lora.checkpointing import path_names

from fedjax_lora.errors import WireError
from fedjax_lora.security import identity

Frame = dict[str, bytes]
TREE_PREFIX = "tree:"


@dataclasses.dataclass
class Message:
  kind: str
  meta: dict
  trees: dict[str, Any]


def pack(kind: str, meta: dict | None = None, **trees) -> Frame:
  """A frame of `kind` with JSON `meta` and the given array trees (None trees are left out)."""
  frame = {"kind": kind.encode(), "meta": json.dumps(meta or {}, sort_keys=True).encode()}
  for name, tree in trees.items():
    if tree is not None:
      frame[TREE_PREFIX + name] = identity.tree_bytes(tree)
  return frame


def unpack(frame: Frame) -> Message:
  """The message in `frame`; WireError names what is missing or malformed."""
  try:
    kind = bytes(frame["kind"]).decode()
  except (KeyError, UnicodeDecodeError, TypeError) as e:
    raise WireError(f"frame without a readable 'kind' ({type(e).__name__})") from None
  try:
    meta = json.loads(bytes(frame.get("meta", b"{}")).decode())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WireError(f"{kind} frame: field 'meta' is not JSON ({e})") from None
  trees = {name[len(TREE_PREFIX):]: identity.parse_tree_bytes(bytes(data), f"{kind} frame "
                                                                f"field {name}")
           for name, data in frame.items() if name.startswith(TREE_PREFIX)}
  return Message(kind, meta, trees)


def tree_payload(frame: Frame, name: str) -> bytes | None:
  """The raw bytes of tree `name` (what a site signed), or None."""
  data = frame.get(TREE_PREFIX + name)
  return None if data is None else bytes(data)


def tree_like(template, parsed: dict):
  """`parsed` (nested dicts from `identity.parse_tree_bytes`) in the structure of `template`
  (optimizer states, typed keys' data): each leaf found by its path names."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  out = []
  for path, leaf in leaves:
    node = parsed
    names = path_names(path)
    try:
      for name in names:
        node = node[name]
    except (KeyError, TypeError):
      raise WireError(f"a stored tree lacks {'/'.join(names)}") from None
    if np.shape(node) != np.shape(leaf):
      raise WireError(f"{'/'.join(names)}: shape {np.shape(node)}, expected {np.shape(leaf)}")
    out.append(np.asarray(node))
  return jax.tree_util.tree_unflatten(treedef, out)


def frame_bytes(frame: Frame) -> int:
  """Bytes a frame puts on the wire (its names and values)."""
  return sum(len(k) + len(v) for k, v in frame.items())


class Transport(Protocol):
  """How the server reaches the sites: Flower's Grid, or the in-process loopback.

  `nodes` waits up to `timeout` seconds for at least `minimum` connected nodes and returns
  their ids. `exchange` sends each node its frame and returns, per node, its reply frame, or
  a string saying why there is none (an error at the site, a timeout, a lost node); nodes
  that did not answer within `timeout` seconds are reported as "timeout"."""

  def nodes(self, minimum: int, timeout: float) -> list[int]: ...

  def exchange(self, messages: dict[int, Frame], timeout: float) -> dict[int, Frame | str]: ...

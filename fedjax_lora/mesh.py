"""Device placement: clients over a `clients` mesh axis, base weights optionally over `fsdp`.

Inputs are placed with `NamedSharding` and `jax.jit` partitions the round from them; no
`pmap`. A client axis that does not divide evenly over the devices stays replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models import quant


def make_mesh(clients: int = 0, fsdp: int = 1, num_clients: int | None = None) -> Mesh:
  """A ("clients", "fsdp") mesh; clients=0 picks the most devices that divide num_clients."""
  devices = jax.devices()
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must divide the {len(devices)} devices")
  avail = len(devices) // fsdp
  if clients == 0:
    clients = max(d for d in range(1, avail + 1)
                  if avail % d == 0 and (num_clients is None or num_clients % d == 0))
  if clients * fsdp > len(devices):
    raise ValueError(f"mesh {clients} x {fsdp} needs more than the {len(devices)} devices")
  grid = np.array(devices[:clients * fsdp]).reshape(clients, fsdp)
  return Mesh(grid, ("clients", "fsdp"))


def client_placer(mesh: Mesh):
  """Puts every array with a leading axis divisible by the clients axis on P("clients")."""
  size = mesh.shape["clients"]

  def place(tree, client_axis=True):
    def put(x):
      if x is None:
        return None
      x = np.asarray(x) if not isinstance(x, jax.Array) else x
      if client_axis and x.ndim and x.shape[0] % size == 0:
        return jax.device_put(x, NamedSharding(mesh, P("clients")))
      return jax.device_put(x, NamedSharding(mesh, P()))
    return jax.tree.map(put, tree, is_leaf=lambda x: x is None)
  return place


def shard_base(base: dict, mesh: Mesh) -> dict:
  """Base weights split over `fsdp` where the axis divides, else replicated: a float
  kernel [.., in, out] on its last axis (out); a quantized weight's codes and scales
  [.., out, in / ...] on their rows (out again), so each device dequantizes its own rows."""
  size = mesh.shape["fsdp"]

  def put(x, axis=-1):
    if axis is not None and size > 1 and x.ndim >= 2 and x.shape[axis] % size == 0:
      spec = [None] * x.ndim
      spec[axis] = "fsdp"
      spec = P(*spec)
    else:
      spec = P()
    return jax.device_put(x, NamedSharding(mesh, spec))

  def place(x):
    if isinstance(x, quant.QuantizedWeight):  # double quantization's second level: replicated
      rows = {k: put(getattr(x, k), axis=-2) for k in ("codes", "scales", "offsets")
              if getattr(x, k) is not None}
      return x.replace(**rows, **{k: put(getattr(x, k), axis=None) for k in
                                  ("scale_scales", "scale_mean") if getattr(x, k) is not None})
    return put(x)
  return jax.tree.map(place, base, is_leaf=lambda x: isinstance(x, quant.QuantizedWeight))

"""Per-round Orbax checkpoints of the federated state, with retention of the last N and best round.

One step directory per round (step = round number) holds three items:
  * `state`: the state pytree (`ocp.args.StandardSave`), typed PRNG keys stored as their raw
    `jax.random.key_data` (Orbax cannot write extended dtypes);
  * `round_metrics`: the round's metrics as JSON (any JSON-able mapping, nested allowed);
  * `prng_keys`: which leaves were typed keys and their implementation, so `restore` can
    re-wrap them with `jax.random.wrap_key_data`.
When `best_metric` is set, Orbax also writes its own `metrics` item (just that one value), which
drives the `BestN` preservation policy and `best_round()`.

Retention is Orbax's `AnyPreservationPolicy([LatestN(keep_last), BestN(n=1)])`: a round is
deleted once it is neither among the last `keep_last` rounds nor the best so far. Rounds that did
not report the best metric (or reported NaN/inf) rank as the worst; ties go to the later round.

Saving is asynchronous: `save` returns once the arrays are copied to host memory (so the caller
may donate or overwrite them) and writes in the background. `wait()` makes every save durable.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

STATE = "state"
ROUND_METRICS = "round_metrics"
PRNG_KEYS = "prng_keys"
BEST_MODES = ("min", "max")


# ---- typed PRNG keys ----------------------------------------------------------------------------

def path_names(path: tuple) -> tuple[str, ...]:
  """A key path as plain strings, the same for a dict/list tree and Orbax's restored dicts/lists."""
  names = []
  for entry in path:
    for attr in ("key", "idx", "name"):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
    else:
      names.append(str(entry))
  return tuple(names)


def is_key(leaf: Any) -> bool:
  """True for typed PRNG key arrays and their abstract `ShapeDtypeStruct`s."""
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def key_layout(tree: Any) -> dict[tuple[str, ...], str]:
  """Path -> implementation name (e.g. "threefry2x32") of every concrete typed key in `tree`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_names(p): str(jax.random.key_impl(x)) for p, x in leaves if is_key(x)}


def keys_to_data(tree: Any) -> Any:
  """Replaces typed keys by their uint32 key data (what is written to disk)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def data_to_keys(tree: Any, layout: Mapping[tuple[str, ...], str],
                 target: Any | None = None) -> Any:
  """Inverse of `keys_to_data`: wraps the leaves at `layout`'s paths with `wrap_key_data`.

  With a `target`, only leaves that are typed keys in the target are wrapped (a uint32 leaf in
  the target asks for the raw data back), and a key in the target with no stored key is an error.
  """
  wanted = set(layout)
  if target is not None:
    wanted = {path_names(p) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]
              if is_key(x)}
    if missing := sorted(wanted - set(layout)):
      raise ValueError(f"target has PRNG keys at {['/'.join(m) for m in missing]}, but the "
                       "checkpoint stored plain data there")

  def wrap(path, x):
    names = path_names(path)
    return jax.random.wrap_key_data(x, impl=layout[names]) if names in wanted else x
  return jax.tree_util.tree_map_with_path(wrap, tree)


def storage_target(target: Any) -> Any:
  """`target` with typed keys (concrete or abstract) replaced by abstract uint32 key data."""
  def convert(x):
    if not is_key(x):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    data = jax.random.key_data(x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)
  return jax.tree.map(convert, target)


# ---- helpers ------------------------------------------------------------------------------------

def _json_default(x: Any) -> Any:
  if isinstance(x, (np.ndarray, np.generic, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _jsonable_metrics(metrics: Mapping[str, Any]) -> dict:
  if not isinstance(metrics, Mapping):
    raise ValueError(f"metrics must be a mapping of name -> value, got {type(metrics).__name__}")
  try:
    return json.loads(json.dumps(dict(metrics), default=_json_default))
  except (TypeError, ValueError) as e:
    raise ValueError(f"metrics must be JSON-serialisable: {e}") from e


def _leaf_spec(x: Any) -> tuple[tuple[int, ...], str]:
  shape = tuple(getattr(x, "shape", np.shape(x)))
  dtype = getattr(x, "dtype", None)
  return shape, str(np.dtype(dtype) if dtype is not None else np.asarray(x).dtype)


def _check_matches(stored: Any, target: Any, where: str):
  """Raises ValueError listing path/shape/dtype differences between the stored tree and target."""
  flat = lambda t: {path_names(p): _leaf_spec(x)
                    for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  have, want = flat(stored), flat(target)
  problems = [f"{'/'.join(k)} not in checkpoint" for k in want.keys() - have.keys()]
  problems += [f"{'/'.join(k)} not in target" for k in have.keys() - want.keys()]
  problems += [f"{'/'.join(k)}: stored {have[k][1]}{list(have[k][0])}, target "
               f"{want[k][1]}{list(want[k][0])}"
               for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]
  if problems:
    shown = "; ".join(sorted(problems)[:8]) + (" ..." if len(problems) > 8 else "")
    raise ValueError(f"{where} does not match the restore target ({len(problems)} "
                     f"difference(s)): {shown}")


# ---- the checkpointer ---------------------------------------------------------------------------

class RoundCheckpointer:
  """Orbax `CheckpointManager` keyed by round, keeping the last `keep_last` rounds and the best.

  keep_last: rounds kept by recency (None keeps every round).
  best_metric: name of a top-level metric whose best round is kept as well (None: recency only).
  best_mode: "min" or "max" for best_metric.
  """

  def __init__(self, directory: str | os.PathLike, keep_last: int | None = 3,
               best_metric: str | None = None, best_mode: str = "min",
               async_save: bool = True):
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                  or keep_last < 1):
      raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
    if best_mode not in BEST_MODES:
      raise ValueError(f"best_mode must be one of {BEST_MODES}, got {best_mode!r}")
    if best_metric is not None and (not isinstance(best_metric, str) or not best_metric):
      raise ValueError(f"best_metric must be a non-empty string or None, got {best_metric!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.keep_last, self.best_metric, self.best_mode = keep_last, best_metric, best_mode
    policies = [ocp_managers.LatestN(n=keep_last)]
    best_fn = None
    if best_metric is not None:
      best_fn = self._score
      policies.append(ocp_managers.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                         keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        best_fn=best_fn, best_mode=best_mode, enable_async_checkpointing=async_save)
    handlers = {STATE: ocp.StandardCheckpointHandler(), ROUND_METRICS: ocp.JsonCheckpointHandler(),
                PRNG_KEYS: ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

  def _score(self, metrics: Any) -> float:
    """Orbax ranking value; missing or non-finite values rank worst."""
    worst = math.inf if self.best_mode == "min" else -math.inf
    value = metrics.get(self.best_metric) if isinstance(metrics, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      return worst
    return float(value)

  # ---- saving -----------------------------------------------------------------------------------
  def save(self, round: int, state: Any, metrics: Mapping[str, Any]) -> None:  # noqa: A002
    """Starts writing `state` and `metrics` as round `round` (> every saved round)."""
    if isinstance(round, bool) or not isinstance(round, (int, np.integer)) or round < 0:
      raise ValueError(f"round must be a non-negative int, got {round!r}")
    round = int(round)  # noqa: A001
    latest = self.latest_round()
    if latest is not None and round <= latest:
      raise ValueError(f"round {round} is not after the latest saved round {latest} in "
                       f"{self.directory}")
    record = _jsonable_metrics(metrics)
    layout = key_layout(state)
    items = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(keys_to_data(state)),
        ROUND_METRICS: ocp.args.JsonSave(record),
        PRNG_KEYS: ocp.args.JsonSave({"keys": [[list(p), impl] for p, impl in layout.items()]}),
    })
    tracked = None
    if self.best_metric is not None:  # {} ranks worst; None would make Orbax warn every round
      value = record.get(self.best_metric)
      tracked = {} if self._score(record) in (math.inf, -math.inf) else {self.best_metric: value}
    if not self._manager.save(round, args=items, metrics=tracked):
      raise RuntimeError(f"Orbax declined to save round {round} in {self.directory}")

  def wait(self) -> None:
    """Blocks until every pending save is on disk (and old rounds are pruned)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> RoundCheckpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def set_aside(self, round: int, destination: str | os.PathLike) -> str:  # noqa: A002
    """Moves round `round`'s directory out of the manager (a checkpoint that failed its
    integrity check is kept for inspection, not deleted); returns where it went."""
    self.wait()
    source = os.path.join(self.directory, str(int(round)))
    os.makedirs(destination, exist_ok=True)
    target = os.path.join(os.fspath(destination), str(int(round)))
    suffix = 0
    while os.path.exists(target):
      suffix += 1
      target = os.path.join(os.fspath(destination), f"{int(round)}.{suffix}")
    os.replace(source, target)
    self._manager.reload()
    return target

  # ---- queries ----------------------------------------------------------------------------------
  def all_rounds(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_round(self) -> int | None:
    return self._manager.latest_step()

  def best_round(self) -> int | None:
    """Round with the best `best_metric`; None without best_metric or if no round reported it."""
    if self.best_metric is None:
      return None
    step = self._manager.best_step()
    if step is None or math.isinf(self._score(self._manager.metrics(step) or {})):
      return None
    return step

  # ---- restoring --------------------------------------------------------------------------------
  def structure_mismatch(self, round: int, target: Any) -> str | None:  # noqa: A002
    """What differs between round `round`'s stored tree and `target` (None: they match);
    tells a checkpoint written under another config from a damaged one."""
    step = self._resolve(round)
    stored = self._manager.item_metadata(step)[STATE]
    try:
      _check_matches(getattr(stored, "tree", stored), storage_target(target),
                     f"round {step} in {self.directory}")
    except ValueError as e:
      return str(e)
    return None

  def restore_on_host(self, round: int) -> tuple[Any, dict]:  # noqa: A002
    """Restores round `round` onto this process's first device, whatever mesh wrote it
    (for audits and tools that have neither the run's config nor its devices)."""
    step = self._resolve(round)
    stored = self._manager.item_metadata(step)[STATE]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                                         sharding=device),
                          getattr(stored, "tree", stored))
    return self.restore(step, target=target)

  def _resolve(self, round: int | None) -> int:  # noqa: A002
    rounds = self.all_rounds()
    if not rounds:
      raise FileNotFoundError(f"no checkpoints in {self.directory}")
    if round is None:
      return rounds[-1]
    if round not in rounds:
      raise FileNotFoundError(f"round {round} not found in {self.directory}; "
                              f"available rounds: {rounds}")
    return int(round)

  def restore(self, round: int | None = None, target: Any | None = None  # noqa: A002
              ) -> tuple[Any, dict]:
    """Returns (state, metrics) of `round` (default: latest).

    target: a concrete or abstract (`jax.ShapeDtypeStruct`) pytree with the saved structure,
    shapes and dtypes; arrays come back bit for bit, typed keys as keys, jax leaves with the
    target's sharding (abstract leaves without one: the saved sharding), numpy leaves as numpy.
    Without a target the tree comes back in Orbax's generic form (dicts and lists, saved
    shardings) with typed keys re-wrapped where their path still matches.
    """
    step = self._resolve(round)
    where = f"round {step} in {self.directory}"
    keys_item = self._manager.restore(
        step, args=ocp.args.Composite(**{PRNG_KEYS: ocp.args.JsonRestore()}))[PRNG_KEYS]
    layout = {tuple(p): impl for p, impl in keys_item["keys"]}
    if target is None:
      state_args = ocp.args.StandardRestore()
    else:
      abstract = storage_target(target)
      stored = self._manager.item_metadata(step)[STATE]
      _check_matches(getattr(stored, "tree", stored), abstract, where)
      state_args = ocp.args.StandardRestore(abstract)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE: state_args, ROUND_METRICS: ocp.args.JsonRestore()}))
    state = data_to_keys(restored[STATE], layout, target)
    return state, dict(restored[ROUND_METRICS])

"""Faulty and malicious sites for robustness experiments (config.faults).

A fault plan maps site names to one behaviour, active from `start_round` on:
  nan / inf            the upload is poisoned with NaN / +Inf;
  scale                the site's update y_k − x is multiplied by `scale` (default 100);
  sign_flip            the update is negated (gradient ascent);
  label_flip           the site trains on its data with every supervised target token sent
                       through a fixed random permutation of the vocabulary (wrong answers
                       in the right places), so its update is honest work on poisoned labels;
  dropout              the site never reports back (absent before training);
  drop_after_masking   (secure aggregation) the site masks its update, then vanishes;
  unsigned / forged / replay
                       (ledger) the upload carries no signature, a signature by an unregistered
                       key, or the site resends its signed upload of an earlier round.
Upload faults act on what the site sends, after its local training.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

UPLOAD_KINDS = ("nan", "inf", "scale", "sign_flip")
KINDS = UPLOAD_KINDS + ("label_flip", "dropout", "drop_after_masking", "unsigned", "forged",
                        "replay")
SIGNING_KINDS = ("unsigned", "forged", "replay")


@dataclasses.dataclass(frozen=True)
class FaultPlan:
  by_site: tuple[tuple[str, str], ...] = ()
  scale: float = 100.0
  start_round: int = 1

  def kind(self, site: str, round_index: int) -> str | None:
    if round_index < self.start_round:
      return None
    return dict(self.by_site).get(site)

  def kinds(self) -> set[str]:
    return {k for _, k in self.by_site}


def parse_faults(spec: str, sites: list[str], scale: float = 100.0,
                 start_round: int = 1) -> FaultPlan:
  """'site:kind,site:kind' -> FaultPlan; ValueError naming the bad entry."""
  entries = []
  for item in (s.strip() for s in (spec or "").split(",")):
    if not item:
      continue
    site, sep, kind = item.rpartition(":")
    if not sep or not site:
      raise ValueError(f"config.faults.sites: entry {item!r} must be 'site:kind'")
    if site not in sites:
      raise ValueError(f"config.faults.sites: unknown site {site!r} in {item!r}; training sites "
                       f"are {', '.join(sites)}")
    if kind not in KINDS:
      raise ValueError(f"config.faults.sites: unknown fault {kind!r} in {item!r}; choose one of "
                       f"{', '.join(KINDS)}")
    if site in dict(entries):
      raise ValueError(f"config.faults.sites: site {site!r} is listed twice")
    entries.append((site, kind))
  if not np.isfinite(scale):
    raise ValueError(f"config.faults.scale must be finite, got {scale}")
  if start_round < 1:
    raise ValueError(f"config.faults.start_round must be >= 1, got {start_round}")
  return FaultPlan(tuple(entries), float(scale), int(start_round))


def upload_faults(plan: FaultPlan, clients: list[str], round_index: int) -> dict[str, np.ndarray]:
  """Per-client arrays for `apply_upload_faults`: update scale [K] and additive poison [K]."""
  scale = np.ones(len(clients), np.float32)
  poison = np.zeros(len(clients), np.float32)
  for i, site in enumerate(clients):
    kind = plan.kind(site, round_index)
    if kind == "scale":
      scale[i] = plan.scale
    elif kind == "sign_flip":
      scale[i] = -1.0
    elif kind == "nan":
      poison[i] = np.nan
    elif kind == "inf":
      poison[i] = np.inf
  return {"scale": scale, "poison": poison}


def apply_upload_faults(global_params, stacked, fault: dict):
  """y_k' = x + scale_k (y_k − x) + poison_k; exact identity for honest clients (1, 0)."""
  def one(x, y):
    shape = (-1,) + (1,) * (y.ndim - 1)
    s, p = fault["scale"].reshape(shape), fault["poison"].reshape(shape)
    bad = (s != 1.0) | (p != 0.0)
    faulty = x.astype(jnp.float32)[None] + s * (y.astype(jnp.float32) - x[None]) + p
    return jnp.where(bad, faulty.astype(y.dtype), y)
  return jax.tree.map(one, global_params, stacked)


def label_permutation(vocab_size: int, special_ids, seed: int) -> np.ndarray:
  """A fixed random permutation of token ids that leaves special tokens (bos/eos/pad) alone."""
  rng = np.random.default_rng([seed, 7])
  perm = np.arange(vocab_size)
  special = {int(i) for i in special_ids if i is not None and 0 <= int(i) < vocab_size}
  movable = np.array([i for i in range(vocab_size) if i not in special])
  perm[movable] = movable[rng.permutation(len(movable))]
  return perm


def flip_labels(batch: dict[str, np.ndarray], perm: np.ndarray) -> dict[str, np.ndarray]:
  """Sends the supervised target tokens (loss_mask > 0) of one client's batches through `perm`."""
  tokens = batch["tokens"]
  flipped = np.where(batch["loss_mask"] > 0, perm[np.clip(tokens, 0, len(perm) - 1)], tokens)
  return {**batch, "tokens": flipped.astype(tokens.dtype)}

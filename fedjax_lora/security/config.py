"""How a federation protects its rounds: the settings both the sites and the server read."""

from __future__ import annotations

import dataclasses

from fedjax_lora import faults


@dataclasses.dataclass(frozen=True)
class SecurityConfig:
  """config.security (+ the fault plan and DP figures the round needs), typed by
  experiment.build; its defaults are in configs/federate.py. With ledger and
  secure_aggregation off a round is one fused program."""
  ledger: bool              # signed uploads, verified before aggregation, and the hash-chain
                            # ledger of <workdir>/ledger.jsonl (needs a workdir)
  keep_uploads: bool        # with the ledger: keep every round's uploads and global adapter
                            # in <workdir>/uploads for launch.audit to replay
  max_update_norm: float    # quarantine uploads with ||y_k - x|| above this (0: off);
                            # non-finite uploads are always quarantined
  secure_aggregation: bool  # the server sees only masked uploads and their sum
  secagg_frac_bits: int     # fixed-point fractional bits in the 2^64 ring
  secagg_threshold: float   # Shamir threshold: more than this fraction must survive
  faults: faults.FaultPlan
  dp_delta: float           # delta of the reported (epsilon, delta)
  client_dp_noise: float    # dp_fedavg's noise multiplier, for its accounting
  config_hash: str          # committed to by the ledger's genesis block

  @property
  def split_round(self) -> bool:
    """The host must see the uploads between training and aggregation."""
    return self.ledger or self.secure_aggregation

"""Simulated secure aggregation (Bonawitz et al., CCS 2017, eprint 2017/281) for weighted FedAvg.

Why: the server should learn only sum_k n_k x_k and sum_k n_k over the clients that finished a
round, never one client's update. Weighting is therefore done client-side: each client masks
the fixed-point vector [n_k x_k, n_k] and the server divides the two unmasked sums.

Protocol (semi-honest, one round, run in-process with real primitives):
  1. Each client makes an X25519 key pair and a 32-byte self-mask seed b_u; the server
     broadcasts all public keys.
  2. Each client Shamir-shares (t-of-n, over GF(2^521 - 1)) its X25519 private key and b_u
     among all clients of the round. Shares travel client to client (`ShareBundle`); the real
     protocol encrypts them under a second key pair and routes them through the server, which
     this simulation takes as a private channel.
  3. Client u sends y_u = q(x_u) + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv) mod 2^64,
     with s_uv = HKDF-SHA256(X25519(u, v), info = round and both ids in sorted order), so the
     pairwise masks cancel in sum_u y_u and are fresh every round.
  4. For each client the server asks the survivors for shares of b_u (u survived) or of u's
     private key (u dropped after masking), never both: each client refuses to reveal the
     second kind for the same peer. The server removes the self masks of survivors and the
     left-over pairwise masks between dropped clients and survivors.

The PRG is AES-256-CTR (seed = key, zero nonce; every key is used for exactly one stream), read
as little-endian uint64. Fixed point: q(x) = round(x * 2^f) in two's complement modulo 2^64.

This package is the public face; the parts live in private modules, each importing only those
listed before it: `_errors` (SecAggError), `_fixed_point` (the ring encoding and its error
bound), `_prg` (PRG and key derivation), `_shamir` (secret sharing), `_protocol` (client,
server and `secure_weighted_mean`).
"""

from __future__ import annotations

from fedjax_lora.privacy.secagg._errors import SecAggError
from fedjax_lora.privacy.secagg._fixed_point import (DEFAULT_FRAC_BITS, dequantize,
                                                     quantization_bound, quantize, safe_range)
from fedjax_lora.privacy.secagg._prg import SEED_BYTES, pairwise_seed, prg
from fedjax_lora.privacy.secagg._protocol import (MIN_SURVIVORS, SecAggClient, SecAggResult,
                                                  SecAggRound, SecAggServer, ShareBundle,
                                                  secure_weighted_mean)
from fedjax_lora.privacy.secagg._shamir import PRIME, Share, reconstruct_secret, split_secret

__all__ = [
    "DEFAULT_FRAC_BITS", "MIN_SURVIVORS", "PRIME", "SEED_BYTES", "SecAggClient", "SecAggError", "SecAggResult",
    "SecAggRound", "SecAggServer", "Share", "ShareBundle", "dequantize", "pairwise_seed", "prg",
    "quantization_bound", "quantize", "reconstruct_secret", "safe_range", "secure_weighted_mean",
    "split_secret",
]

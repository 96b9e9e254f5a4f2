"""Shamir secret sharing over GF(2^521 - 1): t-of-n shares of 32-byte secrets."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from fedjax_lora.privacy.secagg._errors import SecAggError

PRIME = 2**521 - 1  # Mersenne prime: the Shamir field, large enough for 32-byte secrets

Share = tuple[int, int]  # (x, y) point of a Shamir polynomial over GF(PRIME)


def _eval_poly(coeffs: Sequence[int], x: int) -> int:
  acc = 0
  for c in reversed(coeffs):
    acc = (acc * x + c) % PRIME
  return acc


def split_secret(secret: bytes, n: int, t: int, rng=None) -> list[Share]:
  """t-of-n Shamir shares at x = 1..n; any t-1 of them are independent of the secret.

  rng: anything with `randrange` (default `secrets.SystemRandom()`); a seeded
  `random.Random` is for reproducible simulations only, not for real secrets.
  """
  if not isinstance(secret, bytes) or len(secret) * 8 >= PRIME.bit_length():
    raise SecAggError(f"secret must be bytes shorter than {PRIME.bit_length() // 8} bytes")
  if isinstance(n, bool) or isinstance(t, bool) or not 1 <= t <= n:
    raise SecAggError(f"Shamir needs 1 <= t <= n, got t={t!r}, n={n!r}")
  rng = secrets.SystemRandom() if rng is None else rng
  coeffs = [int.from_bytes(secret, "big")] + [rng.randrange(PRIME) for _ in range(t - 1)]
  return [(x, _eval_poly(coeffs, x)) for x in range(1, n + 1)]


def _interpolate_at_zero(shares: Sequence[Share]) -> int:
  xs = [x % PRIME for x, _ in shares]
  if len(set(xs)) != len(xs) or 0 in xs:
    raise SecAggError("Shamir shares must have distinct non-zero x coordinates")
  total = 0
  for i, (xi, yi) in enumerate(shares):
    num, den = 1, 1
    for j, xj in enumerate(xs):
      if j != i:
        num = num * -xj % PRIME
        den = den * (xi - xj) % PRIME
    total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
  return total


def reconstruct_secret(shares: Sequence[Share], length: int) -> bytes:
  """The `length`-byte secret from >= t shares.

  Fewer than t shares interpolate to a uniform field element, which fits in `length` bytes with
  negligible probability; that case is reported instead of returning garbage.
  """
  if not shares:
    raise SecAggError("cannot reconstruct a secret from zero shares")
  value = _interpolate_at_zero(list(shares))
  if value >> (8 * length):
    raise SecAggError(
        f"the {len(shares)} shares do not interpolate to a {length}-byte secret: too few shares "
        "(below the threshold) or shares of different secrets")
  return value.to_bytes(length, "big")

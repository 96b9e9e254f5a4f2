"""A hospital's side of a deployed federation: one process (or resident worker) per site.

The site keeps to itself its notes, its Ed25519 key and whatever its algorithm keeps
between rounds (fedsa_lora's B, dual_lora's local adapter, SCAFFOLD's control variate,
optimizer moments). It answers three messages from the coordinator:

  hello     the run's config and nonce: the site loads its installed base, tokenizes its
            own examples with the base's tokenizer, and answers with its key, a signature
            over the nonce and a challenge, its token count and its sequence lengths.
  train     round r: the global adapter, the server's broadcast state, the shapes and the
            random keys the server fixed; the site trains (`rounds.site_update`), keeps the
            state it would hold if accepted as *pending*, and answers with its upload,
            signed over (run nonce, round, site, update hash).
  decision  round r accepted or not (`rounds.site_accept`): a pending state becomes the
            site's state only when the server accepted that round's upload.

State lives under `<site_dir>/runs/<nonce>/`, one file per round, so a coordinator that
restarts from an older checkpoint asks for (and gets) the state the site held then.

Layout of a site directory (what a hospital installs; `launch.deploy_local` makes them):
  site.json          {"site": name, "base": HF directory, .gguf or named base,
                      "data": directory with train.jsonl [, dev.jsonl]}
  identity/keys/<site>.pem   the site's private key (created on first start)
  identity/registry.json     its public entry, to give to the coordinator
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np

from fedjax_lora import batching, experiment, files
from fedjax_lora.algorithms import select_factors
from fedjax_lora.data import prepare, templates
from fedjax_lora.deploy import protocol, records, secagg_wire, wire
from fedjax_lora.errors import DeployError, WireError
from fedjax_lora.rounds import RoundSpec, initial_site_state, site_accept, site_update
from fedjax_lora.security import identity, site_side
from models import checkpoints, quant

SITE_FILE = "site.json"


@dataclasses.dataclass(frozen=True)
class SiteSettings:
  """<site_dir>/site.json: who this site is, which base it installed, where its data is."""
  site: str
  base: str
  data: Path

  @classmethod
  def read(cls, site_dir: Path) -> "SiteSettings":
    path = site_dir / SITE_FILE
    try:
      raw = json.loads(path.read_text())
    except FileNotFoundError:
      raise DeployError(f"{path}: missing (a site directory needs site.json with site, base "
                        "and data)") from None
    except json.JSONDecodeError as e:
      raise DeployError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    for field in ("site", "base", "data"):
      if not isinstance(raw.get(field), str) or not raw[field]:
        raise DeployError(f"{path}: field {field!r} must be a non-empty string")
    data = Path(raw["data"])
    return cls(raw["site"], raw["base"], data if data.is_absolute() else site_dir / data)


def write_site_dir(site_dir: Path, site: str, base: str, train, dev=None) -> Path:
  """A site directory holding `train` (and `dev`) examples, for `base` (demo and tests)."""
  site_dir.mkdir(parents=True, exist_ok=True)
  records.write_examples(site_dir / "data" / "train.jsonl", train)
  if dev:
    records.write_examples(site_dir / "data" / "dev.jsonl", dev)
  files.write_atomic(site_dir / SITE_FILE, json.dumps(
      {"site": site, "base": str(base), "data": "data"}, indent=1))
  identity.ensure_identities(site_dir / "identity", [site])
  return site_dir


@functools.lru_cache(maxsize=2)
def _base(path: str, dtype: str, remat: str, attention_impl: str, qc: quant.QuantConfig):
  """(config, graphdef, params, tokenizer) of an installed base, kept across runs."""
  resolved = checkpoints.resolve(path, gguf=qc.reads_gguf)
  cfg = checkpoints.load_config(resolved, param_dtype=dtype, dtype=dtype, remat=remat,
                                attention_impl=attention_impl or None)
  cfg, graphdef, base = checkpoints.load_params(resolved, cfg, quantize=qc)
  return cfg, graphdef, base, checkpoints.load_tokenizer(resolved)


_COMPILED: dict = {}


class _Run:
  """One run's loaded pieces at the site: base, its own arrays, the round spec, programs."""

  def __init__(self, settings: SiteSettings, nonce: str, config, example_noise: float,
               log: Callable[[str], None]):
    t0 = time.perf_counter()
    self.nonce, self.config = nonce, config
    m = config.model
    self.model_cfg, self.graphdef, self.base, tokenizer = _base(
        settings.base, m.dtype, m.remat, m.attention_impl, experiment.quant_config(config))
    t1 = time.perf_counter()
    d = config.data
    renderer = templates.make_renderer(tokenizer, d.get("prompt_format", "paper"))
    self.arrays = {}
    for split in ("train", "dev"):
      path = settings.data / f"{split}.jsonl"
      if split == "dev" and not path.exists():
        continue
      self.arrays[split] = prepare.split_arrays(records.read_examples(path), renderer, d)
    t2 = time.perf_counter()
    # The server calibrated the DP-SGD noise for the whole federation: use its figure.
    config = ml_collections.ConfigDict(config.to_dict())
    config.privacy.example_noise, config.privacy.example_target_epsilon = example_noise, 0.0
    parts = experiment.federation_parts(config, self.model_cfg, [len(self.arrays["train"])],
                                        [settings.site], True, log)
    self.parts = parts
    self.spec = RoundSpec(parts.algorithm, parts.client, parts.spec, parts.local_spec, "vmap",
                          0, config.aggregator.gamma, config.aggregator.temperature,
                          config.keep_optimizer_state)
    self.update = jax.jit(functools.partial(site_update, self.spec, self.graphdef))
    self.accept = jax.jit(functools.partial(site_accept, self.spec))
    self.timings = {"load_base": t1 - t0, "tokenize": t2 - t1}


class SiteRunner:
  """Answers the coordinator's frames for one site (see the module docstring)."""

  def __init__(self, site_dir: Path, settings: SiteSettings, me: identity.SiteIdentity,
               log: Callable[[str], None]):
    self.site_dir, self.settings, self.me, self.log = site_dir, settings, me, log
    self._runs: dict[str, _Run] = {}

  @classmethod
  def open(cls, site_dir: str | Path, log: Callable[[str], None] = print) -> "SiteRunner":
    site_dir = Path(site_dir).resolve()
    settings = SiteSettings.read(site_dir)
    me = identity.ensure_identities(site_dir / "identity", [settings.site])[settings.site]
    return cls(site_dir, settings, me, log)

  @property
  def name(self) -> str:
    return self.settings.site

  def handle(self, frame: wire.Frame) -> wire.Frame:
    msg = wire.unpack(frame)
    handler = {protocol.HELLO: self._hello, protocol.TRAIN: self._train,
               protocol.DECISION: self._decision, protocol.SECAGG_KEYS: self._secagg_keys,
               protocol.SECAGG_DEAL: self._secagg_deal,
               protocol.SECAGG_REVEAL: self._secagg_reveal}.get(msg.kind)
    if handler is None:
      raise WireError(f"site {self.name}: unknown message kind {msg.kind!r}")
    return handler(msg)

  # ---- runs ------------------------------------------------------------------------------------
  def _run_dir(self, nonce: str) -> Path:
    if not nonce or not all(c in "0123456789abcdef" for c in nonce):
      raise WireError(f"site {self.name}: bad run nonce {nonce[:40]!r}")
    return self.site_dir / "runs" / nonce

  def _run(self, nonce: str) -> _Run:
    """The run's pieces, loaded once per process (a fresh process reads run.json)."""
    if nonce not in self._runs:
      path = self._run_dir(nonce) / "run.json"
      if not path.exists():
        raise DeployError(f"site {self.name}: run {nonce[:12]} never said hello here")
      saved = json.loads(path.read_text())
      self._runs[nonce] = _Run(self.settings, nonce,
                               ml_collections.ConfigDict(json.loads(saved["config"])),
                               saved["example_noise"], self.log)
    return self._runs[nonce]

  def _hello(self, msg: wire.Message) -> wire.Frame:
    meta = msg.meta
    nonce = meta["nonce"]
    run_dir = self._run_dir(nonce)
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_atomic(run_dir / "run.json", json.dumps(
        {"config": meta["config"], "example_noise": meta["example_noise"]}))
    self._runs.pop(nonce, None)
    run = self._run(nonce)
    train = run.arrays["train"]
    lengths = {split: int(a.tokens.shape[1]) for split, a in run.arrays.items()}
    reply = {"site": self.name, "client_id": self.me.client_id,
             "public_key": protocol.public_key_hex(self.me),
             "token_count": train.token_count, "examples": len(train), "lengths": lengths,
             "signature": protocol.sign_hello(self.me, nonce, meta["challenge"]).hex(),
             "timings": run.timings}
    self.log(f"site {self.name}: hello from run {nonce[:12]}: {len(train)} training examples, "
             f"{train.token_count} supervised tokens, lengths {lengths}")
    return wire.pack(protocol.HELLO_REPLY, reply)

  # ---- state -----------------------------------------------------------------------------------
  def _state_file(self, nonce: str, kind: str, r: int) -> Path:
    return self._run_dir(nonce) / kind / f"round_{r:06d}.bin"

  def _own_state(self, run: _Run, global_params, before: int) -> dict:
    """The state this site held after round `before` (its latest kept file at or before it;
    the initial state when it has none)."""
    template = initial_site_state(run.spec, run.model_cfg, global_params, run.parts.run.seed)
    if not template:
      return template
    folder = self._run_dir(run.nonce) / "state"
    rounds = sorted(int(p.stem.split("_")[1]) for p in folder.glob("round_*.bin")) \
        if folder.exists() else []
    rounds = [r for r in rounds if r <= before]
    if not rounds:
      return template
    data = (folder / f"round_{rounds[-1]:06d}.bin").read_bytes()
    return wire.tree_like(template, identity.parse_tree_bytes(data, str(folder)))

  def _commit(self, nonce: str, r: int, accepted: bool) -> None:
    """The server's decision on round r: keep the pending state, or drop it."""
    pending = self._state_file(nonce, "pending", r)
    if not pending.exists():
      return
    if accepted:
      kept = self._state_file(nonce, "state", r)
      kept.parent.mkdir(parents=True, exist_ok=True)
      pending.replace(kept)
    else:
      pending.unlink()

  def _decision(self, msg: wire.Message) -> wire.Frame:
    meta = msg.meta
    self._commit(meta["nonce"], int(meta["round"]), bool(meta["accepted"]))
    return wire.pack(protocol.DECISION_REPLY, {"site": self.name, "round": meta["round"]})

  # ---- secure aggregation ----------------------------------------------------------------------
  # The site's secrets of a round (mask key, self-mask seed, the shares it holds) live in its
  # own run directory between messages, so a fresh process per message works too.
  def _secagg_file(self, nonce: str, r: int) -> Path:
    return self._run_dir(nonce) / "secagg" / f"round_{r:06d}.bin"

  def _secagg_load(self, nonce: str, r: int) -> secagg_wire.SiteSecAgg:
    path = self._secagg_file(nonce, r)
    if not path.exists():
      raise DeployError(f"site {self.name}: no secure-aggregation state for round {r}")
    return secagg_wire.SiteSecAgg.from_bytes(path.read_bytes())

  def _secagg_save(self, nonce: str, r: int, sa: secagg_wire.SiteSecAgg) -> None:
    path = self._secagg_file(nonce, r)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, sa.to_bytes(), mode=0o600)

  def _secagg_keys(self, msg: wire.Message) -> wire.Frame:
    nonce, r = msg.meta["nonce"], int(msg.meta["round"])
    self._run(nonce)  # a run this site joined
    sa = secagg_wire.SiteSecAgg(self.name, r)
    self._secagg_save(nonce, r, sa)
    return wire.pack(protocol.SECAGG_REPLY, {"site": self.name, "round": r,
                                             "keys": sa.advertise()})

  def _secagg_deal(self, msg: wire.Message) -> wire.Frame:
    nonce, r = msg.meta["nonce"], int(msg.meta["round"])
    sa = self._secagg_load(nonce, r)
    deal = sa.deal(msg.meta["public"], int(msg.meta["threshold"]))
    self._secagg_save(nonce, r, sa)
    return wire.pack(protocol.SECAGG_REPLY, {"site": self.name, "round": r,
                                             "deal": {k: v.hex() for k, v in deal.items()}})

  def _secagg_reveal(self, msg: wire.Message) -> wire.Frame:
    nonce, r = msg.meta["nonce"], int(msg.meta["round"])
    sa = self._secagg_load(nonce, r)
    shares = sa.reveal(msg.meta["survivors"], msg.meta["dropped"])
    self._secagg_save(nonce, r, sa)
    return wire.pack(protocol.SECAGG_REPLY, {"site": self.name, "round": r,
                                             "shares": shares})

  # ---- a round ---------------------------------------------------------------------------------
  def _train(self, msg: wire.Message) -> wire.Frame:
    meta, trees = msg.meta, msg.trees
    nonce, r = meta["nonce"], int(meta["round"])
    if meta.get("site") != self.name:
      raise WireError(f"site {self.name}: a train message for site {meta.get('site')!r}")
    for decided in meta.get("decided", []):  # decisions this site may have missed
      self._commit(nonce, int(decided["round"]), bool(decided["accepted"]))
    # A coordinator that resumed from an older checkpoint re-runs rounds >= r: what this site
    # kept or trained for them belongs to the abandoned timeline.
    for kind in ("state", "pending"):
      folder = self._run_dir(nonce) / kind
      for path in folder.glob("round_*.bin") if folder.exists() else ():
        if int(path.stem.split("_")[1]) >= r:
          path.unlink()
    run = self._run(nonce)
    t0 = time.perf_counter()
    global_params = trees["global"]
    server = trees.get("server", {})
    own = self._own_state(run, global_params, r - 1)
    rng = np.random.default_rng(meta["batch_seed"])
    rp = run.parts.run
    batches, step_mask = batching.round_batches(
        [run.arrays["train"]], rp.batch_size, rp.accumulation, rp.epochs, [rng],
        int(meta["length"]), int(meta["max_steps"]))
    batches = {k: v[0] for k, v in batches.items()}
    key = jax.random.wrap_key_data(np.asarray(trees["key"]["data"], np.uint32))
    rank_mask = trees.get("rank_mask", {}).get("mask")
    args = (run.base, global_params, server, own, batches, step_mask[0], key, rank_mask)
    # One executable per (spec, base, shapes) in this process: the loopback's sites share it.
    signature = (run.spec, id(run.graphdef), repr(jax.tree.map(
        lambda x: (np.shape(x), str(x.dtype)), args[1:])))
    compile_s = 0.0
    if signature not in _COMPILED:
      t = time.perf_counter()
      _COMPILED[signature] = run.update.lower(*args).compile()
      compile_s = time.perf_counter() - t
    t1 = time.perf_counter()
    out, metrics = _COMPILED[signature](*args)
    alg = run.spec.algorithm
    upload = {"update": select_factors(out["trained"]["global"], alg.sends)}
    if alg.scaffold:
      upload["control_delta"] = out["control_delta"]
    if alg.needs_validation and alg.local_adapter:
      upload["local"] = out["trained"]["local"]
    upload = jax.device_get(upload)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
    train_s = time.perf_counter() - t1
    if own:
      pending = self._state_file(nonce, "pending", r)
      pending.parent.mkdir(parents=True, exist_ok=True)
      new_own = jax.device_get(run.accept(own, out, True))
      files.write_atomic(pending, identity.tree_bytes(new_own))
    sec = run.parts.security
    if sec.secure_aggregation:  # the masked, token-weighted update instead of the factors
      sa = self._secagg_load(nonce, r)
      sa.receive({k: bytes.fromhex(v) for k, v in meta["shares"].items()})
      vector = site_side.update_vector(out["trained"]["global"], global_params, alg.sends)
      payload = sa.mask(vector, float(run.arrays["train"].token_count),
                        sec.secagg_frac_bits).tobytes()
      self._secagg_save(nonce, r, sa)
    else:
      payload = protocol.upload_payload(upload)
    signed = identity.sign_upload(self.me, r, identity.bytes_hash(payload), nonce)
    reply = {"site": self.name, "round": r, "client_id": self.me.client_id,
             "run": nonce, "update_hash": signed.update_hash,
             "signature": signed.signature.hex(), "metrics": metrics,
             "timings": {"state_and_batches": t1 - t0 - compile_s, "compile": compile_s,
                         "train": train_s, **run.timings}}
    run.timings = {}  # load and tokenize are reported once, with the first round
    return {**wire.pack(protocol.UPLOAD, reply), protocol.PAYLOAD: payload}

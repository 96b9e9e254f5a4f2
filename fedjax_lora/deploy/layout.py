"""Lays out a deployment on one machine: a coordinator workdir and one directory per site.

In a real deployment each hospital makes its own site directory (its notes as example
records, its installed base, its key) and hands the coordinator only its public key; the
coordinator holds the run config, the key registry and its validation examples. For the
local demo and the tests, `lay_out` cuts a data config into sites as the simulator does
(`experiment.prepare_data`) and writes each site's share into its own directory, so every
process reads only what its role owns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from fedjax_lora import experiment, files
from fedjax_lora.deploy import records, server, site as site_lib
from fedjax_lora.errors import ConfigError
from fedjax_lora.security import identity

SITES_DIR = "sites"


def lay_out(config, workdir: str | Path, log: Callable[[str], None] = print, data=None,
            timeouts: server.Timeouts = server.Timeouts(), limit: int = 0) -> dict[str, Path]:
  """Writes the coordinator's files into `workdir` and each training site's directory under
  `workdir/sites/` (the first `limit` training sites; 0: all); returns {site: directory}.
  A config without a base gets the tiny random one made once here (`workdir/base_model`),
  which every site then installs."""
  workdir = Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  config = config.copy_and_resolve_references()
  experiment.check_config(config)
  server.refuse_unsupported(config)
  if data is None:
    data = experiment.prepare_data(config, workdir / "data", log)
  if not config.model.path:
    experiment.load_model(config, len(data.tokenizer), workdir, data.tokenizer, log)
    config.model.path = str(workdir / "base_model")
  names = [n for n, s in data.sites.items() if s.role == "train"]
  if limit > len(names):
    raise ConfigError(f"--sites={limit}, but the data config has only {len(names)} training "
                      f"sites ({', '.join(names)})")
  names = names[:limit or None]
  if config.lora.site_ranks and limit:
    config.lora.site_ranks = tuple(config.lora.site_ranks)[:limit]
  per_site = config.run.val_examples_per_site
  dirs, registry = {}, {}
  for name in names:
    examples = data.sites[name].examples
    dirs[name] = site_lib.write_site_dir(workdir / SITES_DIR / name, name, config.model.path,
                                         examples["train"], examples.get("dev"))
    registry.update(json.loads((dirs[name] / "identity" / identity.REGISTRY).read_text()))
    if per_site and examples.get("dev"):
      records.write_examples(workdir / server.VALIDATION_DIR / f"{name}.jsonl",
                             examples["dev"][:per_site])
  (workdir / "identity").mkdir(exist_ok=True)
  files.write_atomic(workdir / "identity" / identity.REGISTRY,
                     json.dumps(registry, indent=1, sort_keys=True))
  server.write_deploy_file(workdir, config, names, timeouts)
  log(f"laid out {len(names)} sites under {workdir / SITES_DIR} (base {config.model.path})")
  return dirs

r"""Builds the configured federated sites and prints a per-site data table.

  python -m launch.prepare_data --out_dir=/tmp/data                     # synthetic default
  python -m launch.prepare_data --config=configs/data_five_sites.py \
      --out_dir=/tmp/five_sites                                         # real corpora

Writes report.json (the table's numbers, every skip with its reason), report.md,
splits.json (document ids per site and split) and the tokenized Arrow cache under
out_dir. Any config field can be overridden, e.g. --config.max_length=512 or
--config.sites.phee.max_train_examples=500.
"""

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

import configs
from fedjax_lora.data import prepare
from launch import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(configs.__file__).parent / "data_synthetic.py"),
    "Data config (ml_collections): sites, labels, partition, tokenizer, max_length.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where report, split ids and the token cache go "
                               "(default: print only, nothing written).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  data = prepare.prepare(_CONFIG.value, _OUT_DIR.value,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
  table = prepare.report_table(data.report)
  print(table)
  if _OUT_DIR.value:
    (Path(_OUT_DIR.value) / "report.md").write_text(table + "\n")
    print(f"\nwrote {_OUT_DIR.value}/report.json, report.md, splits.json", file=sys.stderr)


if __name__ == "__main__":
  errors.run(main)

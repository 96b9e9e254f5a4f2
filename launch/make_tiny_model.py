r"""Writes a tiny random LLaMA checkpoint (HF format) with a byte-level tokenizer.

  python -m launch.make_tiny_model --out=/tmp/fedjax_tiny [--config.model.num_layers=2]
"""

from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from launch import errors
from models import hf_checkpoint, llama
from models.config import LlamaConfig
from models.tokenizer import build_byte_tokenizer

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(configs.__file__).parent / "tiny_model.py"), "Model shape config (ml_collections).")
_OUT = flags.DEFINE_string("out", None, "Directory to write the checkpoint into.", required=True)


def main(argv):
  del argv
  cfg = _CONFIG.value
  config = LlamaConfig(**cfg.model.to_dict())
  _, params = llama.init_model(config, seed=cfg.seed)
  out = hf_checkpoint.save_params(_OUT.value, config, params)
  build_byte_tokenizer(out)
  logging.info("wrote %.2fM-parameter random LLaMA to %s", config.num_params() / 1e6, out)
  print(out)


if __name__ == "__main__":
  errors.run(main)

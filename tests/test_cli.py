"""The README's main job: make a tiny model, generate from it, with and without an adapter."""

import os
import subprocess
import sys

import jax

from models import hf_checkpoint, peft_io
from models import lora as lora_lib
from models.tokenizer import build_byte_tokenizer, load_tokenizer


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                        timeout=300)


def test_byte_tokenizer_roundtrips_any_text(tmp_path):
  build_byte_tokenizer(tmp_path)
  tok = load_tokenizer(tmp_path)
  text = "Pt c/o SOB; BP 140/90 → started lisinopril 10 mg. Ünïcödé ✓"
  ids = tok(text)["input_ids"]
  assert ids[0] == tok.bos_token_id == 1 and max(ids) < 259
  assert tok.decode(ids, skip_special_tokens=True) == text


def test_make_tiny_model_and_generate(tmp_path):
  model_dir = tmp_path / "tiny"
  made = _run("launch.make_tiny_model", f"--out={model_dir}", "--config.model.num_layers=2")
  assert made.returncode == 0, made.stderr
  config = hf_checkpoint.load_config(model_dir)
  assert config.num_layers == 2

  fresh = lora_lib.init_adapter(config, lora_lib.LoraSpec(rank=2, alpha=4), jax.random.key(0))
  peft_io.export_adapter(tmp_path / "fresh", fresh, config.num_layers, str(model_dir))
  trained = fresh.replace(params=jax.tree.map(
      lambda x: x + 2.0 * jax.random.normal(jax.random.key(1), x.shape), fresh.params))
  peft_io.export_adapter(tmp_path / "trained", trained, config.num_layers, str(model_dir))

  prompts = ["--prompt=Patient denies chest pain.", "--prompt=BP 120/80", "--prompt=x"]
  generate = lambda *extra: _run("launch.generate", f"--model={model_dir}", *prompts,
                                 "--max_new_tokens=8", "--batch_size=2", *extra)
  plain = generate()
  assert plain.returncode == 0, plain.stderr
  blocks = plain.stdout.split("### prompt\n")[1:]
  assert [b.split("\n")[0] for b in blocks] == ["Patient denies chest pain.", "BP 120/80", "x"]
  assert all(b.split("### completion\n")[1].strip() for b in blocks), plain.stdout
  # A fresh adapter (B = 0) leaves the greedy output unchanged; a trained one changes it.
  same = generate(f"--adapter={tmp_path / 'fresh'}")
  assert same.returncode == 0, same.stderr
  assert same.stdout == plain.stdout
  changed = generate(f"--adapter={tmp_path / 'trained'}")
  assert changed.returncode == 0, changed.stderr
  assert changed.stdout != plain.stdout

  missing = _run("launch.generate", f"--model={tmp_path / 'nope'}", "--prompt=x")
  assert missing.returncode != 0
  assert "no such directory" in missing.stderr
  assert "Traceback" not in missing.stderr

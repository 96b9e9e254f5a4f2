"""fedjax-lora: federated LoRA fine-tuning of LLaMA-family models in JAX."""

"""Throughput benchmark: the JAX simulator against transformers + peft (eager and compiled)."""

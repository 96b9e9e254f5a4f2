"""Evaluation: the paper's scoring protocol (method.md §7) in `metrics`."""

from fedjax_lora.eval.metrics import (COLLAPSED, Aligned, Token, aggregate, align_example,
                                      align_tokens, bio_strict_scores, bio_to_spans,
                                      harmonic_mean, jaccard_match, prf, score, spans_to_bio,
                                      tokenize, worst_site)

__all__ = ["COLLAPSED", "Aligned", "Token", "aggregate", "align_example", "align_tokens",
           "bio_strict_scores", "bio_to_spans", "harmonic_mean", "jaccard_match", "prf", "score",
           "spans_to_bio", "tokenize", "worst_site"]

"""Partitioners (deterministic, disjoint, covering, skew grows as alpha falls) and encoding."""

import numpy as np
import pytest

from fedjax_lora.data import arrays, encoding, partition
from fedjax_lora.data.markup import Span
from fedjax_lora.data.tasks import Example
from models.tokenizer import build_byte_tokenizer

LABELS = [f"type{i % 6}" for i in range(1200)]


def _check_partition(parts, n):
  flat = [i for p in parts for i in p]
  assert sorted(flat) == list(range(n)), "partition must be disjoint and covering"


@pytest.mark.parametrize("make", [
    lambda seed: partition.iid(len(LABELS), 5, seed),
    lambda seed: partition.quantity(len(LABELS), 5, 0.5, seed),
    lambda seed: partition.dirichlet(LABELS, 5, 0.3, seed),
])
def test_partitions_are_deterministic_disjoint_and_covering(make):
  a, b, c = make(0), make(0), make(1)
  assert a == b and a != c
  _check_partition(a, len(LABELS))


def test_natural_partition_groups_by_source():
  sites, names = partition.natural(["phee", "chia", "phee", "ddi"])
  assert names == ["phee", "chia", "ddi"] and sites == [[0, 2], [1], [3]]


def test_dirichlet_skew_grows_as_alpha_falls():
  div = {alpha: np.mean([partition.label_divergence(LABELS, partition.dirichlet(
      LABELS, 5, alpha, seed)) for seed in range(5)]) for alpha in (100.0, 1.0, 0.1)}
  iid = np.mean([partition.label_divergence(LABELS, partition.iid(len(LABELS), 5, s))
                 for s in range(5)])
  assert iid < 0.1  # sampling noise only
  assert div[100.0] < div[1.0] < div[0.1]
  assert div[0.1] > 0.4


def test_quantity_skew_varies_sizes_but_keeps_min_size():
  parts = partition.quantity(1000, 8, 0.3, seed=0, min_size=5)
  sizes = sorted(len(p) for p in parts)
  assert sizes[0] >= 5 and sizes[-1] > 3 * sizes[0]


def test_impossible_splits_raise():
  with pytest.raises(ValueError, match="cannot split"):
    partition.iid(3, 5, 0)
  with pytest.raises(ValueError, match="alpha"):
    partition.dirichlet(LABELS, 5, 0.0, 0)


def _examples():
  out = []
  for i in range(6):
    text = f"Patient {i} takes aspirin." + " again" * (i * 3)
    prompt = f"### Input Text:\n{text}\n### Output Text:\n"
    target = text.replace("aspirin", '<span class="drug">aspirin</span>')
    out.append(Example("s", "ner", f"d{i}", prompt, target, text, (Span(0, 1, "drug"),)))
  return out


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
  return build_byte_tokenizer(tmp_path_factory.mktemp("tok"))


def test_encoding_masks_counts_and_truncation(byte_tok, tmp_path):
  exs = _examples()
  enc = encoding.encode(exs, byte_tok, max_length=128)
  full = arrays.to_arrays(enc, 0, 128, "full")
  comp = arrays.to_arrays(enc, 0, 128, "completion")
  lengths = [len(e.prompt.encode()) + len(e.target.encode()) + 2 for e in exs]
  assert full.truncated == sum(n > 128 for n in lengths) > 0
  assert full.tokens.shape == (6, 128) and full.tokens.dtype == np.int32
  assert full.token_count == sum(min(n, 128) - 1 for n in lengths)
  assert np.array_equal(full.loss_mask.astype(bool), full.attention_mask)
  # Completion-only: the first supervised token is the first byte of the target.
  i = 0
  first = int(np.argmax(comp.loss_mask[i]))
  assert first == len(exs[i].prompt.encode()) + 1
  assert byte_tok.decode(full.tokens[i, first:first + 5]) == exs[i].target[:5]
  assert full.tokens[i, 0] == byte_tok.bos_token_id
  assert full.tokens[i, lengths[i] - 1] == byte_tok.eos_token_id


def test_encoding_pads_to_a_bucket(byte_tok):
  enc = encoding.encode(_examples()[:1], byte_tok, max_length=800)
  arr = arrays.to_arrays(enc, 0, 800)
  assert arr.tokens.shape[1] == 128  # 100-odd tokens round up to the next power of two
  assert arrays.bucket_size(700, cap=800) == 800


def test_training_and_decoding_buckets_are_one_functions_values(byte_tok):
  from fedjax_lora.eval import decoding
  assert decoding.bucket_size is arrays.bucket_size  # decoding calls the one rule
  for n in range(1, 2100):
    # Decoding pads a prompt to the bucket a training sequence of n tokens gets (uncapped).
    assert decoding.prompt_bucket(n) == arrays.bucket_size(n) >= max(n, 16)
    assert arrays.bucket_size(n, cap=800) == min(800, decoding.prompt_bucket(n))
    # The rows of a last decoding batch: the same rule with minimum 1, capped at the batch.
    assert decoding.batch_sizes(n, 16)[-1] == arrays.bucket_size(n % 16 or 16, minimum=1,
                                                                cap=16)
  assert [arrays.bucket_size(n) for n in (0, 1, 16, 17, 100, 128, 129)] == \
      [16, 16, 16, 32, 128, 128, 256]
  for examples in (_examples()[:1], _examples()):  # training: the longest row's bucket
    arr = arrays.to_arrays(encoding.encode(examples, byte_tok, 800), 0, 800)
    longest = int(arr.attention_mask.sum(axis=1).max())
    assert arr.tokens.shape[1] == min(800, decoding.prompt_bucket(longest))


def _rows(n, length, first_token):
  tokens = np.arange(first_token, first_token + n * length, dtype=np.int32).reshape(n, length)
  attention = np.ones((n, length), bool)
  attention[:, length - 2:] = False
  return arrays.SiteArrays(tokens, attention, attention.astype(np.float32),
                           np.full(n, 2, np.int32), 0)


def test_validation_chunks_take_each_sites_first_rows_and_pad_the_last_chunk():
  a, b = _rows(5, 16, 0), _rows(2, 32, 1000)
  length = arrays.common_length([a, b])
  assert length == 32
  val = arrays.validation_chunks([a, b], 3, 2, length)
  assert val["tokens"].shape == (3, 2, 32)  # 3 + 2 rows in chunks of 2: one padding row
  flat = {k: v.reshape(6, 32) for k, v in val.items()}
  np.testing.assert_array_equal(flat["tokens"][:3, :16], a.tokens[:3])
  np.testing.assert_array_equal(flat["tokens"][3:5], b.tokens)
  assert not flat["attention_mask"][:3, 16:].any() and flat["loss_mask"][:3, 16:].sum() == 0
  assert flat["attention_mask"][5].tolist() == [True] + [False] * 31  # padding row
  assert flat["loss_mask"][5].sum() == 0
  pooled = arrays.pool([a, b])
  assert len(pooled) == 7 and pooled.tokens.shape[1] == 32
  assert pooled.token_count == a.token_count + b.token_count
  assert len(arrays.take_rows(b, 1)) == 1


def test_encoding_cache_is_keyed_by_config_and_tokenizer(byte_tok, tmp_path):
  exs = _examples()
  first = encoding.encode(exs, byte_tok, 128, tmp_path, {"a": 1})
  assert len(list(tmp_path.glob("encoded-*"))) == 1
  again = encoding.encode(exs, byte_tok, 128, tmp_path, {"a": 1})
  assert again["input_ids"] == first["input_ids"]
  assert len(list(tmp_path.glob("encoded-*"))) == 1
  encoding.encode(exs, byte_tok, 128, tmp_path, {"a": 2})
  encoding.encode(exs[:3], byte_tok, 128, tmp_path, {"a": 1})
  assert len(list(tmp_path.glob("encoded-*"))) == 3
  from fedjax_lora.data.bpe import train_bpe
  other_tok = train_bpe([e.prompt + e.target for e in exs] * 5, 300, tmp_path / "bpe")
  encoding.encode(exs, other_tok, 128, tmp_path, {"a": 1})
  assert len(list(tmp_path.glob("encoded-*"))) == 4
  assert not [p for p in tmp_path.iterdir() if p.name.startswith("encoded-") and "." in p.name]


def test_trained_bpe_tokenizer_round_trips(tmp_path):
  from fedjax_lora.data.bpe import train_bpe
  from models.tokenizer import load_tokenizer
  texts = [e.prompt + e.target for e in _examples()] * 20
  train_bpe(texts, 400, tmp_path)
  tok = load_tokenizer(tmp_path)
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
  sample = 'Patient 9 takes <span class="drug">ibuprofen</span> <5 mg\n'
  ids = tok(sample, add_special_tokens=False)["input_ids"]
  assert tok.decode(ids) == sample
  assert len(ids) < len(sample.encode())  # merges were learned
  with pytest.raises(ValueError, match="vocab_size"):
    train_bpe(texts, 100, tmp_path / "small")


def test_completion_boundary_with_the_llama2_tokenizer():
  from models.tokenizer import load_tokenizer
  from tests.shared_data import require_shared
  tok = load_tokenizer(require_shared("models", "raw", "llama2_tokenizer"))
  exs = _examples()
  arr = arrays.to_arrays(encoding.encode(exs, tok, 800), 0, 800, "completion")
  for i, ex in enumerate(exs):
    start = int(arr.prompt_lengths[i])
    end = int(arr.attention_mask[i].sum())
    assert tok.decode(arr.tokens[i, start:end - 1]) == ex.target
    assert arr.tokens[i, 0] == 1 and arr.tokens[i, end - 1] == 2

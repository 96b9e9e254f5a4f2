"""Internal: a benchmark config written to JSON by `launch.benchmark` for its workers."""

import json

import ml_collections


def get_config(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))

"""Released ``params.json`` of real models, as test data (the shapes tests size things from).

``PIXTRAL_12B_PARAMS_JSON`` is Pixtral 12B's file byte for byte as Mistral released it (453 bytes);
``pixtral_args()`` parses it; ``MIXTRAL_8X7B`` / ``MIXTRAL_8X22B`` are the Mixtral releases' params.
"""

from __future__ import annotations

import json
from typing import Any

from provision.formats.params import ModelArgs

PIXTRAL_12B_PARAMS_JSON = """{
  "dim": 5120,
  "n_layers": 40,
  "head_dim": 128,
  "hidden_dim": 14336,
  "n_heads": 32,
  "n_kv_heads": 8,
  "rope_theta": 1000000000.0,
  "norm_eps": 1e-05,
  "vocab_size": 131072,
  "vision_encoder": {
    "hidden_size": 1024,
    "num_channels": 3,
    "image_size": 1024,
    "patch_size": 16,
    "rope_theta": 10000.0,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_token_id": 10
  }
}
"""

MIXTRAL_8X7B: dict[str, Any] = {
    "dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
    "norm_eps": 1e-05, "vocab_size": 32000, "moe": {"num_experts_per_tok": 2, "num_experts": 8}}
MIXTRAL_8X22B: dict[str, Any] = {
    "dim": 6144, "n_layers": 56, "head_dim": 128, "hidden_dim": 16384, "n_heads": 48, "n_kv_heads": 8,
    "rope_theta": 1000000, "norm_eps": 1e-05, "vocab_size": 32000,
    "moe": {"num_experts": 8, "num_experts_per_tok": 2}, "max_seq_len": 65536}


def pixtral_args() -> ModelArgs:
    return ModelArgs.from_dict(json.loads(PIXTRAL_12B_PARAMS_JSON))

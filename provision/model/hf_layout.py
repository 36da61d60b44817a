"""Which ``hf`` layout a model gets: Llava names and config for Pixtral, ``MixtralForCausalLM`` for a
mixture of experts, ``MistralForCausalLM`` otherwise. It sits above ``hf_names`` (dense and Llava
mappings) and ``moe`` (the Mixtral mapping, built on ``hf_names``) so that no import cycle joins them."""

from __future__ import annotations

from typing import Any

from provision.formats.params import ModelArgs
from provision.model.hf_names import hf_config, hf_text_config, mistral_name_to_hf, mistral_name_to_hf_text


def hf_out_name(name: str, args: ModelArgs) -> str:
    """The ``hf``-layout name of a Mistral tensor for this model: Llava names for Pixtral,
    ``MixtralForCausalLM`` names for a mixture of experts, ``MistralForCausalLM`` names otherwise."""
    if args.vision_encoder is not None:
        return mistral_name_to_hf(name)
    if args.moe is not None:
        from provision.model.moe import mistral_name_to_hf_mixtral  # imports torch

        return mistral_name_to_hf_mixtral(name)
    return mistral_name_to_hf_text(name)


def hf_config_for(args: ModelArgs, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """The ``config.json`` of the ``hf`` layout for this model: Llava, Mixtral or Mistral."""
    if args.vision_encoder is not None:
        return hf_config(args, dtype=dtype)
    if args.moe is not None:
        from provision.model.moe import hf_mixtral_config  # imports torch

        cfg = hf_mixtral_config(args, dtype=dtype)
        theta = args.rope_theta_value  # a Mixtral params.json without rope_theta means 1e6, not the dense 10000
        cfg.update({"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}})
        return cfg
    return hf_text_config(args, dtype=dtype)

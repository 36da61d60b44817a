"""The convert stage: a Mistral-format checkpoint cast or quantized for a target GPU, streamed.

``convert`` (in ``stage``) is the stage; ``compare`` holds the optional logit check against the
source and ``record`` the ``provision-convert.json`` it writes. The other modules are its parts:
``source`` (reading the source files), ``items`` (what each tensor becomes), ``prefetch`` and
``stream`` (the streaming loop), ``output`` and ``hf_export`` (the output folder and its side
files), ``serve`` (the ``vllm serve`` line). Importing the package does not import torch.
"""

from provision.stages.convert.compare import compare_logits, should_compare
from provision.stages.convert.hf_export import quantization_config
from provision.stages.convert.record import RECORD_NAME, ConvertResult, TensorReport, read_record
from provision.stages.convert.serve import vllm_command
from provision.stages.convert.stage import convert

__all__ = ["RECORD_NAME", "ConvertResult", "TensorReport", "compare_logits", "convert",
           "quantization_config", "read_record", "should_compare", "vllm_command"]

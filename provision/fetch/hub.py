"""The Hugging Face Hub: the only module that imports huggingface_hub (work in progress)."""

from __future__ import annotations

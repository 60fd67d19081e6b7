"""lmforge.interop: move weights between lmforge and other frameworks' formats.

``hf``: import Hugging Face model folders (GPT-2, Llama-family, BERT) and export lmforge decoders
(GPT-2 style, Llama style) as folders that ``transformers`` loads. Neither direction needs
``transformers`` installed: the module reads and writes ``config.json`` and safetensors itself.
"""

from __future__ import annotations

from lmforge.interop.hf import (
    config_from_hf,
    config_to_hf,
    export_hf,
    load_hf,
    read_hf_config,
    read_hf_weights,
    state_dict_from_hf,
    state_dict_to_hf,
)

__all__ = [
    "load_hf", "export_hf", "config_from_hf", "config_to_hf", "state_dict_from_hf", "state_dict_to_hf",
    "read_hf_config", "read_hf_weights",
]

"""Strict loading of foreign checkpoints through explicit weight maps.

Each source format has its own module with one explicit map from its key names to ours: `llama.py`
(Hugging Face LLaMA-family folders), `lavis.py` (LAVIS BLIP-2 / InstructBLIP checkpoints),
`hf_blip2.py` (transformers Blip2 / InstructBlip Q-Formers), `blip2_parts.py` (either of the two as a
stage's starting point), `eva.py` (LAVIS's EVA ViT-g file, or a transformers `vision_model`, into the
open_clip tower), `hf_export.py` (our LLaMA saved as a Hugging Face folder). They all end in
`weights.py` `load_mapped`, which refuses to guess.

`load_hf_llm(folder)` is the one entry for a language model in a Hugging Face folder: it reads the
folder's config.json and builds the decoder of its family.
"""

from expvl.models.convert.hf_llm import SUPPORTED, load_hf_llm
from expvl.models.convert.weights import (
           CheckpointError,
           load_mapped,
           read_state_dict,
           read_weights,
           weight_files,
)

__all__ = ["SUPPORTED", "CheckpointError", "load_hf_llm", "load_mapped", "read_state_dict", "read_weights",
           "weight_files"]

"""Configuration of the synthesis pipeline (`python -m synthesis`): source, text, VQA, output.

A plain dataclass schema for configs.load_config: YAML files and `key=value` overrides fill it,
and a misspelled key is an error. The LLM API key is deliberately NOT a field (configs get
saved and hashed): the key comes from the environment variable named by `text.llm.api_key_env`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from synthesis.llm_text import LLMConfig
from synthesis.synthfacs.config import SynthFACSConfig
from synthesis.synthfacs.config import hashed_fields as synthfacs_hashed_fields
from synthesis.vqa import VQAConfig


@dataclass
class TextConfig:
    regions: bool = True  # rule-based Q2 regional captions ("region:<name>") per annotated region
    llm: LLMConfig = field(default_factory=LLMConfig)  # LLM captions (off by default)

    def hashed_fields(self) -> dict:
        return {"regions": self.regions, "llm": self.llm.hashed_fields()}


@dataclass
class SynthesisConfig:
    source: str = "synthfacs"  # "synthfacs" (rendered here) or a reader name of synthesis.readers.READERS
    source_root: str = ""  # dataset folder handed to the reader (unused for synthfacs)
    test_fraction: float = 0.0  # > 0: reader records with split "all" get a seeded random train/test
    #                             split (Exp-BLIP's RAF-AU / EmotioNet protocol); subject folds:
    #                             use synthesis.readers.folds and a reader that sets `split`
    synthfacs: SynthFACSConfig = field(default_factory=SynthFACSConfig)  # the renderer's config
    text: TextConfig = field(default_factory=TextConfig)  # captions
    vqa: VQAConfig = field(default_factory=VQAConfig)  # question-answer pairs
    out_dir: str = "data/synthfacs"  # dataset root: manifest.json, shards/, render/, stages/
    shard_size: int = 1000  # records per JSONL shard
    seed: int = 0  # seeds every caption / question choice (per record, order independent)

    def validate(self) -> None:
        if self.source != "synthfacs":
            from synthesis.readers import READERS  # lazy: readers are only needed for real data

            if self.source not in READERS:
                raise ValueError(f"source {self.source!r} is neither 'synthfacs' nor a reader in "
                                 f"{sorted(READERS)}")
            if not self.source_root:
                raise ValueError(f"source {self.source!r} needs source_root (the dataset folder)")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        self.vqa.validate()

    def source_fields(self) -> dict:
        """What determines the label records (the labels stage hash)."""
        if self.source == "synthfacs":
            return {"source": "synthfacs", "synthfacs": synthfacs_hashed_fields(self.synthfacs)}
        return {"source": self.source, "source_root": self.source_root, "test_fraction": self.test_fraction,
                "seed": self.seed}

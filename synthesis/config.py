"""Configuration of the synthesis pipeline (`python -m expvl.synthesis`): source, split, text, VQA, output.

A plain dataclass schema for configs.load_config: YAML files and `key=value` overrides fill it,
and a misspelled key is an error. The LLM API key is deliberately NOT a field (configs get
saved and hashed): the key comes from the environment variable named by `text.llm.api_key_env`.

A real dataset is read by the reader named in `source`, with the options of the section of the
same name (`source=bp4d bp4d.frame_sampling=true`); `split.*` turns its records into train / val /
test (by subject for the AU video datasets), the splits the training datamodules read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from expvl.synthesis.llm_text import LLMConfig
from expvl.synthesis.readers import (
    READERS,
    AffectNetConfig,
    BP4DConfig,
    CSVConfig,
    DISFAConfig,
    EmotioNetConfig,
    GFTConfig,
    RAFAUConfig,
    RAFDBConfig,
    SplitConfig,
)
from expvl.synthesis.synthfacs.config import SynthFACSConfig
from expvl.synthesis.synthfacs.config import hashed_fields as synthfacs_hashed_fields
from expvl.synthesis.vqa import VQAConfig


@dataclass
class TextConfig:
    regions: bool = True  # rule-based Q2 regional captions ("region:<name>") per annotated region
    llm: LLMConfig = field(default_factory=LLMConfig)  # LLM captions (off by default)

    def hashed_fields(self) -> dict:
        return {"regions": self.regions, "llm": self.llm.hashed_fields()}


@dataclass
class SynthesisConfig:
    source: str = "synthfacs"  # "synthfacs" (rendered here) or a reader of synthesis.readers.READERS:
    #   bp4d, disfa, gft, rafau, emotionet, affectnet, rafdb, rafdb_compound, csv
    source_root: str = ""  # dataset folder handed to the reader (unused for synthfacs)
    synthfacs: SynthFACSConfig = field(default_factory=SynthFACSConfig)  # the renderer's config
    # each reader's options, in a section named as its source; only the chosen reader's may be set
    bp4d: BP4DConfig = field(default_factory=BP4DConfig)
    disfa: DISFAConfig = field(default_factory=DISFAConfig)
    gft: GFTConfig = field(default_factory=GFTConfig)
    rafau: RAFAUConfig = field(default_factory=RAFAUConfig)
    emotionet: EmotioNetConfig = field(default_factory=EmotioNetConfig)
    affectnet: AffectNetConfig = field(default_factory=AffectNetConfig)
    rafdb: RAFDBConfig = field(default_factory=RAFDBConfig)
    rafdb_compound: RAFDBConfig = field(default_factory=RAFDBConfig)
    csv: CSVConfig = field(default_factory=CSVConfig)
    split: SplitConfig = field(default_factory=SplitConfig)  # train / val / test of reader records
    #   with split "all" (seeded by `seed`; by subject when they have subjects); off by default
    test_fraction: float = 0.0  # the old name of split.test_fraction (which splits by subject when the
    #   records have subjects); kept so configs saved before (a run's config.yaml) still load; must be 0
    text: TextConfig = field(default_factory=TextConfig)  # captions
    vqa: VQAConfig = field(default_factory=VQAConfig)  # question-answer pairs
    out_dir: str = "data/synthfacs"  # dataset root: manifest.json, shards/, render/, stages/
    shard_size: int = 1000  # records per JSONL shard
    seed: int = 0  # seeds every caption / question choice (per record, order independent)

    def validate(self) -> None:
        if self.source != "synthfacs":
            if self.source not in READERS:
                raise ValueError(f"source {self.source!r} is neither 'synthfacs' nor a reader in "
                                 f"{sorted(READERS)}")
            if not self.source_root:
                raise ValueError(f"source {self.source!r} needs source_root (the dataset folder)")
        for name in READERS:  # a section that would never be read is a mistake, not a no-op
            options = getattr(self, name)
            if name != self.source and options != type(options)():
                raise ValueError(f"{name}.* options are set, but source is {self.source!r}")
        if self.split.enabled and self.source == "synthfacs":
            raise ValueError("split.* splits reader records; SynthFACS renders its own train / val / test "
                             "(synthfacs.n_train, n_val, n_test)")
        if self.test_fraction:
            raise ValueError(f"test_fraction={self.test_fraction}: the option moved to split.test_fraction")
        self.split.validate()
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if not 0.0 <= self.text.llm.max_fallback_share <= 1.0:
            raise ValueError("text.llm.max_fallback_share is a share of the LLM requests, in [0, 1]; got "
                             f"{self.text.llm.max_fallback_share}")
        self.vqa.validate()

    def source_fields(self) -> dict:
        """What determines the label records (the labels stage hash)."""
        if self.source == "synthfacs":
            return {"source": "synthfacs", "synthfacs": synthfacs_hashed_fields(self.synthfacs)}
        return {"source": self.source, "source_root": self.source_root,
                "reader": dataclasses.asdict(self.reader_config()), "split": self.split.hashed_fields(),
                "seed": self.seed}

    def reader_config(self):
        """The options of the reader named by `source` (its section: `bp4d`, `disfa`, ...)."""
        return getattr(self, self.source)

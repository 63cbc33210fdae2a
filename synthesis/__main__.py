"""`python -m expvl.synthesis ...`: the dataset builder's command line (synthesis/build.py)."""

import logging
import sys

from expvl.configs import ConfigError
from expvl.synthesis.build import main
from expvl.synthesis.llm_text import LLMError
from expvl.vocab.records import RecordError
from expvl.vocab.shards import ShardError

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ConfigError, ShardError, RecordError, LLMError, ValueError) as e:
        sys.exit(f"error: {e}")

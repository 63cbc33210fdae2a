"""Readers that turn the label files of real facial-expression datasets into `Record`s.

Labels only (aus, intensities, emotion, subject); captions and VQA pairs are added later by the
text generators. The datasets are licensed and never ship: users pass the local root folder.
Each module's docstring says which file layout it reads, which public code it was checked
against, and where the layout is our assumption (GFT, EmotioNet).

Every reader is `read_x(root, config=None) -> Records` (a `list[Record]` with a `dropped` counter
of the documented categories it left out); `config` is the reader's dataclass beside it
(`BP4DConfig`, ...), which `python -m expvl.synthesis` fills from `<reader>.<field>=...` overrides. Image
paths are relative to root. Bad rows raise `ReaderError` (a ValueError) whose message starts with
`file:line:`.

    records = read_bp4d(Path("/data/BP4D"), BP4DConfig(frame_sampling=True))
    split = folds.split_by_fold(records, folds.BP4D_FOLDS, test_fold=3)
"""

from expvl.synthesis.readers import folds
from expvl.synthesis.readers.affectnet import AffectNetConfig, read_affectnet
from expvl.synthesis.readers.bp4d import BP4DConfig, read_bp4d
from expvl.synthesis.readers.common import ReaderError, Records, sample_video_frames
from expvl.synthesis.readers.csv_generic import CSVConfig, read_csv_generic
from expvl.synthesis.readers.disfa import DISFAConfig, read_disfa
from expvl.synthesis.readers.emotionet import EmotioNetConfig, read_emotionet
from expvl.synthesis.readers.folds import FoldError, SplitConfig
from expvl.synthesis.readers.gft import GFTConfig, read_gft
from expvl.synthesis.readers.rafau import RAFAUConfig, read_rafau
from expvl.synthesis.readers.rafdb import RAFDBConfig, read_rafdb, read_rafdb_compound

READERS = {
    "bp4d": read_bp4d,
    "disfa": read_disfa,
    "gft": read_gft,
    "rafau": read_rafau,
    "emotionet": read_emotionet,
    "affectnet": read_affectnet,
    "rafdb": read_rafdb,
    "rafdb_compound": read_rafdb_compound,
    "csv": read_csv_generic,
}

__all__ = [
    "READERS",
    "AffectNetConfig",
    "BP4DConfig",
    "CSVConfig",
    "DISFAConfig",
    "EmotioNetConfig",
    "FoldError",
    "GFTConfig",
    "RAFAUConfig",
    "RAFDBConfig",
    "ReaderError",
    "Records",
    "SplitConfig",
    "folds",
    "read_affectnet",
    "read_bp4d",
    "read_csv_generic",
    "read_disfa",
    "read_emotionet",
    "read_gft",
    "read_rafau",
    "read_rafdb",
    "read_rafdb_compound",
    "sample_video_frames",
]

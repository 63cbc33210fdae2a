"""SynthFACS: the embedded default dataset, procedurally rendered faces with FACS labels.

    config.py   SynthFACSConfig, config_hash
    sample.py   identities, AU / emotion sampling with FACS constraints, nuisances
    pen.py      drawing primitives in face units (pose applied), colours
    render.py   render_face(params, size): PIL drawing driven by per-side AU intensities
    dataset.py  render_dataset (splits, parallel, cached by config hash), contact_sheet
"""

from expvl.synthesis.synthfacs.config import SynthFACSConfig, config_hash
from expvl.synthesis.synthfacs.dataset import (
    SynthFACSCacheError,
    contact_sheet,
    load_records,
    make_record,
    render_dataset,
    sample_records,
)
from expvl.synthesis.synthfacs.render import render_face
from expvl.synthesis.synthfacs.sample import (
    EXTRA_AUS,
    Expression,
    FaceParams,
    Identity,
    Nuisance,
    apply_constraints,
    face_seed,
    identity_pool,
    sample_expression,
    sample_identity,
    sample_nuisance,
    sample_params,
)

__all__ = [
    "EXTRA_AUS", "Expression", "FaceParams", "Identity", "Nuisance", "SynthFACSCacheError",
    "SynthFACSConfig", "apply_constraints", "config_hash", "contact_sheet", "face_seed",
    "identity_pool", "load_records", "make_record", "render_dataset", "render_face",
    "sample_expression", "sample_identity", "sample_nuisance", "sample_params", "sample_records",
]

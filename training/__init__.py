"""Training: the LightningModules, the stage table, the run folder and its steps.

    stages.py       the three BLIP-2-style stages, declared once (STAGES) and how one is built and run
    pipeline.py     the embedded default: bootstrap.py's stand-ins, then every stage, then evaluation
    single_stage.py one stage of a real recipe (`mode: stage`), its parts from local files
    vlfau.py        VL-FAU runs (one model per part or fold)
    runs.py         the one loader of a finished run (and of a transformers folder)
    run_folder.py   resumable, content-hashed steps of a run folder and the Trainer they use
    checkpoints.py  writing a stage's final.ckpt and reading it back strictly
    lit_*.py        the LightningModules (freezing in lit_base.py)
"""

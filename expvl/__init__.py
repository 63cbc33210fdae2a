"""expvl: vision-language facial expression analysis (Exp-BLIP, Exp-VQA, VL-FAU), from scratch.

    import expvl
    model = expvl.load("runs/default")                    # a run folder, or a transformers InstructBlip folder
    model.ask("face.jpg", "Are the inner brows raised?")  # -> "yes"

Every package of the project is installed under this name: `expvl.models` (plain PyTorch networks),
`expvl.datamodules`, `expvl.synthesis`, `expvl.vocab` (the FACS table and record schema they share),
`expvl.configs`, `expvl.training` (Lightning) and `expvl.evaluation`. `load` and `ExpressionModel`
(expvl/api.py) are imported on first use, so `import expvl.models` stays light.
"""

__all__ = ["ExpressionModel", "load"]


def __getattr__(name: str):
    if name in __all__:
        from expvl import api

        return getattr(api, name)
    raise AttributeError(f"module 'expvl' has no attribute {name!r}")

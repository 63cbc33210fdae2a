"""Evaluation: metrics, probes, the report, and evaluating a run it is handed (never opening one).

    evaluate.py       a BLIP-2 run: Q3 AU F1, emotion accuracy, descriptions, probes, attention maps
    vqa.py            the stage-3 model's answers to the evaluation questions (answerer.py asks them)
    vlfau.py          a VL-FAU run: the AU head's F1 over parts / folds, explanations
    compare.py        per-AU F1 of several evaluated runs side by side
    metrics.py, probes.py, attention_maps.py, report.py   the pieces
"""

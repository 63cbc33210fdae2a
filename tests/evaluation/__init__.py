"""Tests of expvl.evaluation (evaluation/) and eval.py."""

"""Tests of expvl.training (training/) and train.py."""

"""Tests of expvl.vocab (vocab/)."""

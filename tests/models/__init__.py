"""Tests of expvl.models (models/)."""

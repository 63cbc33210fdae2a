"""Tests of the top-level expvl package (expvl/)."""

"""Tests of expvl.configs (configs/)."""

"""Tests of expvl.synthesis (synthesis/)."""

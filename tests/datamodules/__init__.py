"""Tests of expvl.datamodules (datamodules/)."""

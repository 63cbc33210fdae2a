"""Shared test code: fixtures, data writers, fake servers and the scripts tests launch; no tests here."""

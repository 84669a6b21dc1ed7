"""Runs: sessions, the objects a config builds, run folders, the context schemes plan with, reports."""

"""Runners: the torch engine runner."""

"""Policies: CEL rules and declared spend limits, loaded from YAML files, compiled once."""

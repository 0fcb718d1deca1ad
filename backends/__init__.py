"""Tuned launch tables, one TOML file per vendor (data only; read by ``g4route.configs``).

Installed as ``g4route.backends`` so that a non-editable wheel carries the tables.
"""

"""Tuned launch tables, one TOML file per vendor (data only; read by ``g4route.configs``).

Installed as ``g4route.tables`` so that a non-editable wheel carries the tables.
"""

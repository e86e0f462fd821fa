"""Bundled recipes (TOML), installed as the package data of pfl.recipes."""

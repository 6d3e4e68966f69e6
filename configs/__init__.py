"""Bundled configs, installed as ``bitflux_cli.configs``."""

"""Adapters from bitflux's modules to other libraries' protocols, one small module per library.

They own no format of their own: ``diffusers`` loads the directory ``bitflux export --format
diffusers`` writes.
"""

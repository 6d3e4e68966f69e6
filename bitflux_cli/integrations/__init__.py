"""Adapters from bitflux's modules to other libraries' protocols, one small module per library.

They own no format of their own. ``diffusers_quantizer`` maps ``quant_method: bitflux`` to a diffusers
quantizer, so diffusers' ``from_pretrained`` / ``save_pretrained`` read and write the directory that
``bitflux export --format diffusers`` writes (``hooks`` registers it when diffusers is imported);
``diffusers.from_pretrained`` is a thin wrapper of that.
"""

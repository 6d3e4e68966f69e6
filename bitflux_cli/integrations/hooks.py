"""Register bitflux with the libraries it adapts when, and only when, they are imported.

``import bitflux_cli`` calls ``install``: it must stay cheap (the CLI sets up logging before torch
loads), so nothing heavy is imported here. If diffusers' quantizer table is already imported,
bitflux's quantizer is registered at once; otherwise a one-shot import hook registers it right after
``diffusers.quantizers.auto`` is executed, so ``import bitflux_cli`` then ``from diffusers import ...``
works in either order. A failure to register never breaks the import of diffusers itself: it is kept
and warned about, and raised where bitflux's diffusers integration is used
(``diffusers_quantizer.register``).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

TARGET = "diffusers.quantizers.auto"
QUANTIZER = "bitflux_cli.integrations.diffusers_quantizer"


def _register() -> None:
    loading = sys.modules.get(QUANTIZER)
    if loading is not None and getattr(loading.__spec__, "_initializing", False):
        return  # diffusers' table was imported by the quantizer module itself, which registers when it ends
    try:
        importlib.import_module(QUANTIZER).register()
    except Exception as exc:  # noqa: BLE001 - diffusers must import whatever happens here
        warnings.warn(f"bitflux could not register its diffusers quantizer: {exc}", RuntimeWarning, stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``TARGET`` with the other finders and wraps its loader so ``_register`` runs after it executes."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Register with diffusers now if its quantizer table is loaded, else right after it loads (idempotent)."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())

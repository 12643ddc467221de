"""kdcli: distill any image classifier into another.

``import kdcli`` registers kdcli's CIFAR networks (``cifar_*``) with timm, so that it is all plain timm code
needs to build or load them (``timm.create_model("cifar_resnet8")``, ``timm.create_model("local-dir:RUN",
pretrained=True)``). It does so without importing torch or timm itself (which takes seconds and would slow
every ``kdcli`` command, ``--help`` included): at once if timm is already imported, else right after timm's
own import, whenever that comes.
"""

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def _register_with_timm() -> None:
    import kdcli.models.cifar  # noqa: F401  (its import registers the networks)


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``timm`` is first imported, it lets the usual finders locate it and has
    the CIFAR networks registered as soon as timm's package has finished loading."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)  # once only, and not while the usual finders look timm up
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def load_then_register(module):
            load(module)
            _register_with_timm()

        spec.loader.exec_module = load_then_register
        return spec


if "timm" in sys.modules:
    _register_with_timm()
elif not any(isinstance(f, _AfterTimmImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTimmImport())

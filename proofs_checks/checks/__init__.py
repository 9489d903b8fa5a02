"""One module per proposition of docs/theory.md §C (``cNN_<name>.py``); importing this package
imports every such module, which registers its check."""
import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name[:1] == "c" and _info.name[1:3].isdigit():
        importlib.import_module(f"{__name__}.{_info.name}")

"""hivemind's multiaddr parser, without importing the rest of hivemind.

hivemind vendors py-multiaddr as `hivemind.utils.multiaddr`, and importing that runs hivemind's
`__init__`, which imports torch and the whole library (1.8 s here): too slow for checking a command's
addresses before anything else starts (cli/input_checks.py). The vendored package imports only its own
modules, relatively, and small libraries (base58, cid, netaddr, varint), so it is loaded here from
hivemind's folder under a name of its own: the same parser the libp2p daemon's addresses go through.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_NAME = "swarmlm_vendored_multiaddr"


def _vendored() -> ModuleType:
    if (module := sys.modules.get(_NAME)) is not None:
        return module
    hivemind = importlib.util.find_spec("hivemind")  # finds the package without running its __init__
    assert hivemind is not None and hivemind.submodule_search_locations, "hivemind is not installed"
    folder = Path(next(iter(hivemind.submodule_search_locations))) / "utils" / "multiaddr"
    spec = importlib.util.spec_from_file_location(
        _NAME, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module  # before running it: its relative imports look the package up here
    spec.loader.exec_module(module)
    return module


def protocol_names(address: str) -> list[str]:
    """The protocols of a multiaddr, in order ("ip4", "tcp", "p2p", ...); the parser's error if it is not
    one (ValueError, LookupError, binascii errors)."""
    return [p.name for p in _vendored().Multiaddr(address).protocols()]

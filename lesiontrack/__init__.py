"""lesiontrack: longitudinal multiple-sclerosis lesion tracking on MRI."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("lesiontrack")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

__all__ = ["__version__"]

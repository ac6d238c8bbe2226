"""dimscope.daemon — the live pipeline: acquisition, archive, engines, publishing, CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dimscope")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

"""The package version, importable without importing anything else (the CLI's ``--version``)."""

__version__ = "0.1.0"

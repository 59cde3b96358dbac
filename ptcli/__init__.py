"""ptcli: prompt tuning for decoder-only language models, from the command line."""

__version__ = "0.1.0"

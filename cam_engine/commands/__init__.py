"""Subcommands of the ``cam-engine`` command line (see :mod:`cam_engine.cli`)."""

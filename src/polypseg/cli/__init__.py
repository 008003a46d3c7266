"""The ``polypseg`` command line. Each concern registers its commands from its own module."""

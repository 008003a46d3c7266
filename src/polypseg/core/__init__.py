"""Foundation: typed configuration and recipes, the run-folder layout, devices, precision, files, time.

Modules: ``config`` (``RunConfig``, recipes, validation), ``runs`` (``RunDir``, the only code that knows
a run folder's layout), ``devices`` and ``precision`` (one meaning of ``auto``), ``io_utils`` (atomic
writes, printable file names), ``clock`` (elapsed time without pauses), ``rules`` (the value rules
options and files share, e.g. a decision threshold). Nothing here imports another
stage package.
"""

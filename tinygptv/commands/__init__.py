"""Sub-commands of the ``tinygptv`` CLI, one module each (see :mod:`tinygptv.cli`)."""

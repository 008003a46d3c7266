"""``python -m polypseg``: the same CLI as the ``polypseg`` command."""

from polypseg.cli.main import main

main()

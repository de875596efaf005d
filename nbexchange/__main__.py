"""``python -m nbexchange``: the same as the ``nbexchange`` command."""

from nbexchange.app import main

main()

"""``python -m nbexchange``: the same as the ``nbexchange`` command."""

from nbexchange.app import main

if __name__ == "__main__":  # not when another process imports it (as multiprocessing's spawn does)
    main()

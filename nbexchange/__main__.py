"""``python -m nbexchange``: the same as the ``nbexchange`` command."""

from nbexchange.app import main

if __name__ == "__main__":  # not when a spawned child process (the archive checks') imports it
    main()

"""``python -m mudsc_cli`` is the same as the ``mudsc`` command."""

from mudsc_cli.app import main

if __name__ == "__main__":
    main()

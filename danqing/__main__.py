"""``python -m danqing``: the ``danqing`` command."""

from danqing.cli import main

if __name__ == "__main__":
    main()

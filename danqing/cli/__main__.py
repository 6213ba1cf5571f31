"""``python -m danqing.cli``."""

from danqing.cli import main

if __name__ == "__main__":
    main()

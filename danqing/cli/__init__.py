"""The ``danqing`` command line: thin shells that parse options, call the library and print.

One module per command group; importing this package registers every command on ``app`` in
the order ``danqing --help`` lists them.
"""

from __future__ import annotations

# registers the commands, in this (the --help) order
from danqing.cli import generate, workflow, models, edit, serve, scale, control, portrait, comic, train, evaluate, video, threed, talk, unclip  # noqa: F401, I001
from danqing.cli.common import OutTarget, app, main, out_target
from danqing.cli.generate import parse_ip_adapter_option

__all__ = ["OutTarget", "app", "main", "out_target", "parse_ip_adapter_option"]

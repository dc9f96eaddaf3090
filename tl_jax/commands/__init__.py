"""The command line: `tl-jax train|evaluate|predict|convert|archs ...` once installed, or
`python scripts/<train|evaluate|predict|convert_weights>.py ...` from a checkout.

Each command's `main(argv, prog)` parses `argv` and can be called in-process; `tl_jax.cli.run`
turns the library's errors into one line and exit status 2.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from tl_jax import cli

COMMANDS = {'train': 'train', 'evaluate': 'evaluate', 'predict': 'predict', 'convert': 'convert', 'archs': 'archs',
            'check-data': 'check_data', 'export-onnx': 'export_onnx'}
_USAGE = ('usage: tl-jax {train,evaluate,predict,convert,archs,check-data,export-onnx} [options]\n'
          "  'tl-jax COMMAND --help' describes a command's options")


def main(argv: Optional[Sequence[str]] = None) -> None:
  """`tl-jax COMMAND ...`: runs the command and exits with its status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help'):
    print(_USAGE)
    sys.exit(0 if argv else 2)
  if argv[0] not in COMMANDS:
    print(f'{_USAGE}\nerror: unknown command {argv[0]!r}; choose one of {", ".join(COMMANDS)}', file=sys.stderr)
    sys.exit(2)
  command = importlib.import_module(f'tl_jax.commands.{COMMANDS[argv[0]]}')
  cli.run(lambda: command.main(argv[1:], prog=f'tl-jax {argv[0]}'))

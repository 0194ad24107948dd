"""The subcommands of ``volpre``, one module each (``volpre demo-data``: ``demo_data``).

Each module declares its subcommand in ``add_parser(subparsers)`` (options, help, and the
``run`` function argparse stores in ``args.run``) and does its work in ``run(args) -> int``
(a module with actions, such as ``bench``, has one ``run_ACTION`` each). ``options`` holds what
several commands share: the parser of a command or action with its help and ``run``, option
declarations, option checks and :class:`~volpre.commands.options.UserError`.
:mod:`volpre.cli` assembles the modules into one parser and runs the chosen command.

Imports: a command module imports only the standard library, :mod:`volpre.errors` and
``options`` at its top, so that ``volpre --help`` imports no torch; the library layers (data,
engine, export, evaluate, bench, demo) are imported inside ``run``. No library module imports
this package.
"""

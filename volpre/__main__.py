"""``python -m volpre`` (what torchrun launches) is the same as the ``volpre`` command."""

from volpre.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

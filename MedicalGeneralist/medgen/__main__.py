"""`python -m medgen` = the `medgen` command."""

from medgen.cli import entry

entry()

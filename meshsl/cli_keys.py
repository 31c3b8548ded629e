"""The old name of `meshsl.cli.keys`, kept for imports written before the CLI became a package: this module
IS that one (patching an attribute here patches the command)."""
import sys

from meshsl.cli import keys

sys.modules[__name__] = keys

"""The `dd` command line. Each verb lives beside the code it drives and is registered here."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distilled-decoding")
def main() -> None:
    """Distilled Decoding: distil an image AR model (VAR, LlamaGen) into a 1-2 step generator."""


# Verbs are registered below, one line each (keep it that way: helpers add lines here).

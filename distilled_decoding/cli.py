"""The `dd` command line. Each verb lives beside the code it drives and is registered here."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distilled-decoding")
def main() -> None:
    """Distilled Decoding: distil an image AR model (VAR, LlamaGen) into a 1-2 step generator."""


# Verbs are registered below, one line each (keep it that way: helpers add lines here).
from .evaluate import eval_cmd; main.add_command(eval_cmd)  # noqa: E402,E702  dd eval
from .dataset_cli import build_dataset_command, dataset_group; main.add_command(build_dataset_command); main.add_command(dataset_group)  # noqa: E402,E702  dd build-dataset, dd dataset verify|info
from .sampling import sample_cmd; main.add_command(sample_cmd)  # noqa: E402,E702  dd sample
from .train import train_command; main.add_command(train_command)  # noqa: E402,E702  dd train
from .demo import demo_cmd; main.add_command(demo_cmd)  # noqa: E402,E702  dd demo

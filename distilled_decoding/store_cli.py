"""What the `verify` and `info` verbs of every shard store print (`dd dataset`, `dd ard`, `dd sample
--verify`): one `FAIL: <problem>` line each on stderr and exit code 1, else `OK`; a store's summary as
aligned `key: value` lines or JSON."""
from __future__ import annotations

import json
from typing import Sequence

import click


def report_problems(problems: Sequence[str]) -> None:
    """`FAIL:` lines and exit 1 when there are problems, else print OK."""
    if problems:
        for p in problems:
            click.echo(f"FAIL: {p}", err=True)
        raise SystemExit(1)
    click.echo("OK")


def echo_info(info: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    for k, v in info.items():
        click.echo(f"{k:>12}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")

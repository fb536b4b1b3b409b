"""Option choices the commands share, from the settings they choose between (pipeline.config)."""

import click

from pipeline.config import DEVICES, DTYPE_NAMES

DEVICE_CHOICE, DTYPE_CHOICE = click.Choice(DEVICES), click.Choice(DTYPE_NAMES)

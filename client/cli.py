"""The `roost` command: run the broker, administer it, and use it.

Each family of commands lives in its own module and registers itself here.
"""

from __future__ import annotations

import importlib
import logging

import click

from client.cli_common import RootGroup


@click.group(cls=RootGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="roost", prog_name="roost")
def main() -> None:
    """Roost: an MQTT broker for the home where people and devices chat.

    \b
    Start here:
      roost serve                      run the broker (config/roost.yaml)
      roost user add alice             register a person
      roost login alice                store your credentials for the commands below
      roost send bob "hello"           chat
    """


# Families of commands; a missing optional module must not break the rest.
_COMMAND_MODULES = ("client.cli_admin", "client.cli_chat", "client.cli_simulate", "client.cli_status",
                    "client.cli_migrate")

for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:
        if exc.name != _name:
            raise
        logging.getLogger("roost.cli").debug("command module %s not installed", _name)
        continue
    _module.register(main)


if __name__ == "__main__":
    main()

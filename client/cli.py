"""The `roost` command: run the broker, administer it, and use it.

Each family of commands lives in its own module and registers itself here.
"""

from __future__ import annotations

import importlib
import logging

import click

from client.cli_root import RootGroup


class _RoostGroup(RootGroup):
    """`roost serve` imports only the module that defines it (client.cli_admin): the
    other command modules bring the people's SDK, paho-mqtt and urllib, ~1 MB of a
    serving broker's memory (issue 16: RSS before the first client). Any other
    command, `--help` and completion import them all first, as they always did."""

    all_loaded = False

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name != "serve":
            self.load_all()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_all()
        return super().list_commands(ctx)

    def load_all(self) -> None:
        if not self.all_loaded:
            self.all_loaded = True
            _register(self, _LATER_MODULES)


@click.group(cls=_RoostGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


# Families of commands; a missing optional module must not break the rest. `serve`
# is in the first, the others are imported when a command other than serve is asked for.
_FIRST_MODULES = ("client.cli_admin",)
_LATER_MODULES = ("client.cli_chat", "client.cli_simulate", "client.cli_status", "client.cli_migrate")


def _register(group: click.Group, names: tuple[str, ...]) -> None:
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            logging.getLogger("roost.cli").debug("command module %s not installed", name)
            continue
        module.register(group)


_register(main, _FIRST_MODULES)


if __name__ == "__main__":
    main()

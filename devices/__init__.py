"""Device side of Roost: the SDK firmware writers start from (sdk.py) and the
simulated devices built on it (simulators.py). Imports only paho-mqtt and contract/."""

from devices.sdk import Command, CommandError, Device, RequestError

__all__ = ["Device", "Command", "CommandError", "RequestError"]

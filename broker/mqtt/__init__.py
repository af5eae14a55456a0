"""Roost's MQTT 3.1.1 engine: codec, sessions, subscription index, delivery.
engine.py lists its modules, one job each.

It replaces amqtt 0.12.1's per-connection handling (see broker/server.py for the
list of upstream functions replaced) and talks to plugins through the hooks in
broker/mqtt/hooks.py.
"""

"""Roost as one node of a cluster: nodes meet on NATS (docs/CLUSTER.md).

    link.py        the NATS connection: reconnects by itself, one bounded outgoing queue
    wire.py        subjects and the encoding of what nodes tell each other
    peers.py       the other nodes: heartbeats, failure after node_timeout, their interest and wills
    bus.py         ClusterBus: the event bus Protocol with shared domain events
    node.py        ClusterNode: routing to interested nodes, retained, take-over, wills of dead nodes
    plugin.py      the engine's online/offline hooks, reported to the node

Built only when the config has a `cluster:` section (broker/app.py); without it
nothing here is imported.
"""

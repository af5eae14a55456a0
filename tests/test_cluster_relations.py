"""Cluster (issue 12, items 2 and 3): what one node changes about contacts,
blocks, groups, device shares, profiles and devices' latest readings is what every node acts on. Each
node keeps these in memory (relations, blocks, the device users, the
principals' directory) for its ACL and its checks; a change made through one
node reaches the others as a domain event, which each node's service applies.
Here nothing allows messages between strangers (`allow_dm_without_contact` off),
so a node that missed a change would refuse what the test expects."""

from __future__ import annotations

import json

from tests.clients import ImClient, MqttClient, RequestFailed
from tests.nats import wait_until
from tests.test_cluster_im import im, pg_nodes


def refused(client: ImClient, op: str, **params: object) -> str | None:
    """The error code of the request, None when it was answered ok."""
    doc = client.request(op, **params)
    return None if doc["ok"] else str(doc["error"]["code"])


def presence_granted(client: ImClient, principal: str) -> bool:
    """Whether the ACL of the client's node lets it watch `principal`'s presence."""
    topic = f"roost/presence/{principal}"
    granted = client.subscribe(topic, 1)[0] < 0x80
    client.unsubscribe(topic)
    return granted


def test_contacts_blocks_groups_shares_profiles_and_telemetry_agree_across_nodes(tmp_path, nats_server, postgres_dsn) -> None:
    nodes = pg_nodes(tmp_path, nats_server.url, postgres_dsn, ["n1", "n2"],
                     users=("alice", "bob", "carol"), dm_without_contact=False)
    n1, n2 = nodes["n1"], nodes["n2"]
    try:
        alice, carol = im(n1, "alice", "phone"), im(n1, "carol", "phone")
        bob = im(n2, "bob", "laptop")
        assert refused(alice, "send", to="bob", cmid="early", body={"type": "text", "text": "hi"}) == "forbidden"

        # A contact asked for on n1 and accepted on n2: both nodes know it.
        alice.call("contact.request", to="bob")
        bob.wait_event("contact", event="request")
        bob.call("contact.accept", **{"from": "alice"})
        wait_until(lambda: [c["id"] for c in alice.call("contacts")["contacts"]] == ["bob"], 5,
                   "n1 lists bob as alice's contact")
        sent = alice.call("send", to="bob", cmid="c1", body={"type": "text", "text": "hello"})
        assert bob.wait_event("msg", conv=sent["conv"])["seq"] == sent["seq"]
        assert wait_until(lambda: presence_granted(alice, "bob"), 5, "n1's ACL lets alice watch bob")

        # A group made on n1 of alice's contacts: its members on n2 see each other.
        alice.call("contact.request", to="carol")
        carol.call("contact.accept", **{"from": "alice"})
        assert not presence_granted(bob, "carol")
        conv = alice.call("group.create", name="house", members=["bob", "carol"])["conv"]
        assert wait_until(lambda: presence_granted(bob, "carol"), 5, "n2's ACL lets bob watch his group's carol")

        # A lamp claimed and shared on n1 is bob's to see on n2.
        added = json.loads(n1.cli("device", "add", "lamp1", "--kind", "light", "--json").stdout)
        alice.call("device.claim", device="lamp1", code=added["pairing_code"])
        alice.call("device.share", device="lamp1", **{"with": "bob"})
        wait_until(lambda: [d["id"] for d in bob.call("devices")["devices"]] == ["lamp1"], 5,
                   "n2 lists the lamp shared with bob")
        assert bob.call("devices")["devices"][0]["role"] == "sharee"
        # Its telemetry, sent to n1, is its latest reading on n2 too (once saved there).
        lamp = MqttClient("lamp1").connect(n1.host, n1.port, username="lamp1", password=added["secret"])
        lamp.publish("roost/telemetry/lamp1", {"on": True, "brightness": 70}, qos=1)
        wait_until(lambda: (bob.call("devices")["devices"][0]["last_telemetry"] or {}).get("brightness") == 70, 10,
                   "n2 answers the lamp's latest reading")
        lamp.disconnect()
        alice.call("device.unshare", device="lamp1", **{"with": "bob"})
        wait_until(lambda: bob.call("devices")["devices"] == [], 5, "n2 forgets the share")

        # A profile set on n1 is what n2 answers.
        alice.call("profile.set", name="Alice A.", status="in the garden")
        wait_until(lambda: bob.call("profile.get", user="alice").get("name") == "Alice A.", 5,
                   "n2 answers alice's new name")
        assert bob.call("profile.get", user="alice")["status"] == "in the garden"

        # bob blocks alice on n2: n1 refuses her messages to him, his group gets nothing of hers.
        bob.call("contact.block", user="alice")
        attempts = iter(range(1000))    # a new cmid each time: a repeated one would be answered dup
        wait_until(lambda: refused(alice, "send", to="bob", cmid=f"c2-{next(attempts)}",
                                   body={"type": "text", "text": "?"}) == "forbidden",
                   5, "n1 refuses alice's messages to bob")
        carol.call("send", conv=conv, cmid="g1", body={"type": "text", "text": "from carol"})
        alice.call("send", conv=conv, cmid="g2", body={"type": "text", "text": "from alice"})
        carol.call("send", conv=conv, cmid="g3", body={"type": "text", "text": "carol again"})
        got = [bob.wait_event("msg", conv=conv)["from"] for _ in range(2)]
        assert got == ["carol", "carol"]
        try:
            alice.call("contact.request", to="bob")
        except RequestFailed as exc:
            assert exc.code == "forbidden"
        else:
            raise AssertionError("n1 took alice's contact request to bob, who blocked her")
    finally:
        for node in nodes.values():
            node.kill()

"""Cluster (issue 12, items 3 and 4) on one PostgreSQL and one nats-server:
admin changes take effect on every node; a SIGKILLed node's persistent
sessions are resumed on another node with what they were owed; a PostgreSQL
outage answers IM requests `unavailable` while plain MQTT keeps flowing, and
everything recovers by itself."""

from __future__ import annotations

from tests.clients import ConnectFailed, ImClient, MqttClient
from tests.nats import wait_until
from tests.postgres import PostgresServer
from tests.test_cluster_im import im, pg_nodes
from tests.test_cluster_routing import NODE_TIMEOUT, client, until_routed


def refused(node, principal: str, password: str) -> bool:
    try:
        ImClient(principal, "probe").open(node, password, subscribe_inbox=False).disconnect()
    except ConnectFailed:
        return True
    return False


def test_admin_changes_take_effect_on_every_node(tmp_path, nats_server, postgres_dsn) -> None:
    nodes = pg_nodes(tmp_path, nats_server.url, postgres_dsn, ["n1", "n2", "n3"], users=("alice", "bob"))
    try:
        bob1, bob3 = im(nodes["n1"], "bob", "phone"), im(nodes["n3"], "bob", "tv")
        nodes["n2"].cli("user", "remove", "bob")               # an admin command on n2's config
        assert bob1.wait_disconnected(3) and bob3.wait_disconnected(3)
        for c in (bob1, bob3):
            c.paho.loop_stop()
        nodes["n1"].cli("user", "passwd", "alice", "--password-stdin", input="a-new-secret-9\n")
        for node in nodes.values():
            wait_until(lambda n=node: refused(n, "alice", "pw-alice-123"), 3, "the old password refused")
            ImClient("alice", "ok").open(node, "a-new-secret-9").disconnect()   # the new one works everywhere
    finally:
        for node in nodes.values():
            node.kill()


def test_a_killed_nodes_persistent_sessions_resume_on_another_node(tmp_path, nats_server, postgres_dsn) -> None:
    nodes = pg_nodes(tmp_path, nats_server.url, postgres_dsn, ["n1", "n2", "n3"], users=())
    try:
        n2 = nodes["n2"]
        dev = MqttClient("meter", clean_session=False).connect(n2.host, n2.port)
        dev.subscribe("q/#", qos=1)
        dev.disconnect()
        pub = client(n2, "qpub")
        for i in range(3):
            pub.publish("q/reading", str(i), qos=1)    # PUBACK once kept for meter's session in the store
        pub.paho.loop_stop()
        n2.kill()
        # n1 (the first survivor) takes the session over after the node timeout...
        wait_until(lambda: "took over 1 persistent session(s) of node n2" in nodes["n1"].log_path.read_text(),
                   NODE_TIMEOUT + 10, "n1 taking over n2's sessions")
        # ... and meter connects to n3, which has it handed over from n1
        back = MqttClient("meter", clean_session=False)
        back.connect(nodes["n3"].host, nodes["n3"].port)
        assert back.session_present
        assert [back.wait_message("q/reading").payload for _ in range(3)] == [b"0", b"1", b"2"]
        back.disconnect()
    finally:
        for node in nodes.values():
            node.kill()


def test_a_postgres_outage_answers_unavailable_while_mqtt_flows(tmp_path, nats_server) -> None:
    pg = PostgresServer(fsync=True).start()      # its own: this test kills it (and checks what survived)
    try:
        pg.create_database("roost")
        nodes = pg_nodes(tmp_path, nats_server.url, pg.dsn("roost"), ["n1", "n2"], users=("alice", "bob"))
        try:
            alice, bob = im(nodes["n1"], "alice", "phone"), im(nodes["n2"], "bob", "phone")
            assert alice.call("send", to="bob", cmid="before", body={"type": "text", "text": "1"})["seq"] == 1
            sub = client(nodes["n2"], "plain-sub")
            sub.subscribe("plain/#", qos=1)
            pub = client(nodes["n1"], "plain-pub")
            until_routed(pub, sub, "plain/probe")
            pg.kill()
            doc = alice.request("send", to="bob", cmid="during", body={"type": "text", "text": "2"})
            assert not doc["ok"] and doc["error"]["code"] == "unavailable", doc
            pub.publish("plain/x", b"still flowing", qos=1)      # plain MQTT across nodes goes on
            assert sub.wait_message("plain/x").payload == b"still flowing"
            pg.start()
            from tests.clients import eventually_ok

            assert eventually_ok(alice, "send", timeout=20, to="bob", cmid="during",
                                 body={"type": "text", "text": "2"})["seq"] == 2
            assert bob.wait_event("msg", seq=2, timeout=10)
        finally:
            for node in nodes.values():
                node.kill()
    finally:
        pg.remove()

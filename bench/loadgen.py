"""Load-generator worker process: `python -m bench.loadgen SPEC.json`.

The orchestrator (bench/run.py) starts several of these so the generator can use
more than one core. Conversation over stdio, one JSON object per line:

    orchestrator -> worker:  argv[1] = path of the JSON spec; stdin: "go <t0 monotonic ns>",
                             later "stop" (hold mode)
    worker -> orchestrator:  {"event": "ready"}  (connected and subscribed)
                             {"event": "connected", ...}  (hold mode: all connects done)
                             {"event": "result", ...}

Modes:
  mqtt  plain publishers/subscribers; 64-byte payloads carrying (send time, publisher, seq)
        so the subscriber measures latency, loss and duplicates.
  im    Roost IM clients: senders issue `send` requests, recipients take `msg` events from
        their inbox and `ack` them (coalesced: one cumulative ack per received batch).
  hold  connect many idle clients as fast as allowed, hold them until "stop".

Every worker reports its own CPU time and wall time of the measured phase, so the
orchestrator can tell when the generator rather than the broker was the limit.
"""

from __future__ import annotations

import asyncio
import json
import resource
import struct
import sys
from array import array
from typing import Any

from bench.mqtt import Conn, MqttError, connect, now_ns, publish_prefix, v5_props

PAYLOAD = 64
HDR = struct.Struct("<qHI")             # send time ns, publisher index, sequence number
PAD = b"r" * (PAYLOAD - HDR.size)
BATCH = 64                              # messages per write for unpaced publishers
MAX_LAT_SAMPLES = 200_000


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Stats:
    """Counters of one worker, merged into its result line."""

    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.received = 0          # unique messages received by subscribers
        self.dups = 0
        self.first_recv = 0
        self.last_recv = 0
        self.last_ack = 0
        self.last_send = 0
        self.lat_us = array("q")
        self.answer_us = array("q")     # IM: send -> its `ok` response
        self.errors: dict[str, int] = {}
        self.extra: dict[str, int] = {}

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def bump(self, what: str, k: int = 1) -> None:
        self.extra[what] = self.extra.get(what, 0) + k

    def got(self, t: int) -> None:
        if not self.first_recv:
            self.first_recv = t
        self.last_recv = t

    def latency(self, us: int) -> None:
        if len(self.lat_us) < MAX_LAT_SAMPLES:
            self.lat_us.append(us)


# ---- plain MQTT ---------------------------------------------------------------------------

class Seen:
    """Which (publisher, seq) messages arrived: one per subscriber, or one shared by the
    members of a shared subscription, so a message given to two members is a duplicate."""

    def __init__(self, expect: int, seq_space: int) -> None:
        self.expect = expect
        self.seq_space = seq_space
        self.by_pub: dict[int, bytearray] = {}
        self.unique = 0


class Subscriber:
    def __init__(self, spec: dict[str, Any], stats: Stats, seen: Seen | None = None) -> None:
        self.spec = spec
        self.stats = stats
        self.expect = int(spec.get("expect", 0))
        self.seen = seen or Seen(self.expect, int(spec.get("seq_space", 1 << 20)))
        self.label = str(spec.get("group_member", ""))
        self.conn: Conn | None = None

    def on_message(self, topic: bytes, payload: bytes, t: int) -> None:
        st = self.stats
        if len(payload) != PAYLOAD or not payload.endswith(PAD):
            st.error("payload changed in transit")
            return
        ts, idx, seq = HDR.unpack_from(payload)
        seen = self.seen
        got = seen.by_pub.get(idx)
        if got is None:
            got = seen.by_pub[idx] = bytearray(seen.seq_space)
        if seq >= seen.seq_space:
            st.error("seq out of range")
            return
        if got[seq]:
            st.dups += 1
            return
        got[seq] = 1
        seen.unique += 1
        st.received += 1
        if self.label:
            st.bump(f"received_by_{self.label}")
        st.got(t)
        st.latency((t - ts) // 1000)

    @property
    def done(self) -> bool:
        return self.seen.unique >= self.seen.expect


class Publisher:
    def __init__(self, spec: dict[str, Any], stats: Stats) -> None:
        p = spec["pub"]
        self.topic: str = p["topic"]
        self.qos = int(p.get("qos", 0))
        self.count = int(p["count"])
        self.window = max(1, int(p.get("window", 64)))
        self.rate = float(p.get("rate", 0))     # msg/s, 0 = as fast as the window allows
        # Paced publishers start `phase` seconds apart, so that together they send evenly
        # spaced messages rather than all at the same instants (bursts no one asked for).
        self.phase_ns = int(float(p.get("phase", 0)) * 1e9)
        self.index = int(p.get("index", 0))
        # MQTT 5: after the first PUBLISH (topic + Topic Alias 1) only the alias is sent,
        # when the server's CONNACK allowed aliases (Topic Alias Maximum >= 1).
        self.alias = bool(p.get("alias", False))
        self.stats = stats
        self.inflight = 0
        self.acked = 0
        self.wake = asyncio.Event()
        self.conn: Conn | None = None
        self.finished = False

    def on_puback(self, pid: int) -> None:
        self.inflight -= 1
        self.acked += 1
        self.stats.acked += 1
        self.stats.last_ack = now_ns()
        self.wake.set()

    async def run(self, t0: int) -> None:
        conn = self.conn
        assert conn is not None
        v5 = conn.version == 5
        alias = self.alias and conn.topic_alias_maximum >= 1
        if self.alias and not alias:
            self.stats.bump("topic_alias_refused_by_server")
        props = v5_props(1 if alias else 0) if v5 else b""
        first = publish_prefix(self.topic, self.qos, PAYLOAD, props)
        pre = publish_prefix("", self.qos, PAYLOAD, props) if alias else first
        pack = HDR.pack
        idx = self.index
        seq = 0
        pid = 0
        st = self.stats
        while seq < self.count:
            if conn.transport is None or conn.transport.is_closing():
                st.error("publisher connection closed")
                break
            if not conn.writable.is_set():
                await conn.writable.wait()
            k = min(BATCH, self.count - seq)
            if self.rate > 0:
                start = t0 + self.phase_ns
                due = int(max(0, now_ns() - start) * self.rate / 1e9) + 1 if now_ns() >= start else 0
                k = min(k, due - seq)
                if k <= 0:
                    # until message `seq` is due: start + seq / rate
                    await asyncio.sleep(max(0.0, (start + seq * 1e9 / self.rate - now_ns()) / 1e9))
                    continue
            if self.qos:
                k = min(k, self.window - self.inflight)
                if k <= 0:
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                ts = now_ns()
                parts = []
                for s in range(seq, seq + k):
                    pid = pid % 65535 + 1
                    parts.append((pre if s else first) + pid.to_bytes(2, "big") + props + pack(ts, idx, s) + PAD)
                self.inflight += k
            else:
                ts = now_ns()
                parts = [(pre if s else first) + props + pack(ts, idx, s) + PAD for s in range(seq, seq + k)]
            conn.write(b"".join(parts))
            seq += k
            st.sent += k
            await asyncio.sleep(0)
        st.last_send = max(st.last_send, now_ns())
        if alias:
            st.bump("published_with_topic_alias", max(0, seq - 1))
        while self.qos and self.acked < seq and not conn.closed.done():
            self.wake.clear()
            await self.wake.wait()
        self.finished = True


# ---- Roost IM -----------------------------------------------------------------------------

class ImClient:
    """A Roost client: subscribed to its response topic and its principal's inbox."""

    def __init__(self, spec: dict[str, Any], stats: Stats) -> None:
        self.spec = spec
        self.cid: str = spec["cid"]
        self.user: str = spec["user"]
        self.role: str = spec["role"]
        self.stats = stats
        self.req_prefix_topic = f"roost/req/{self.cid}"
        self.resp_topic = f"roost/resp/{self.cid}".encode()
        self.conn: Conn | None = None
        self.pid = 0
        self.wake = asyncio.Event()
        self.outstanding = 0
        self.answered = 0
        self.ok = 0
        self.sent = 0
        # sender
        self.count = int(spec.get("count", 0))
        self.window = max(1, int(spec.get("window", 16)))
        self.rate = float(spec.get("rate", 0))
        self.phase_ns = int(float(spec.get("phase", 0)) * 1e9)   # as Publisher.phase_ns
        self.to = spec.get("to", "")
        self.tag = spec.get("tag", self.cid)    # cmid prefix: unique per run, or retries are dups
        self.send_times: dict[str, int] = {}
        # recipient
        self.expect = int(spec.get("expect", 0))
        self.seen: set[str] = set()
        self.max_n = 0
        self.acked_n = 0
        self.ack_scheduled = False
        self.finished = False

    def request(self, doc: bytes) -> None:
        self.pid = self.pid % 65535 + 1
        pre = publish_prefix(self.req_prefix_topic, 1, len(doc))
        assert self.conn is not None
        self.conn.write(pre + self.pid.to_bytes(2, "big") + doc)

    def on_message(self, topic: bytes, payload: bytes, t: int) -> None:
        st = self.stats
        try:
            doc = json.loads(payload)
        except ValueError:
            st.error("non-JSON message")
            return
        if topic == self.resp_topic:
            self.on_response(doc, t)
        else:
            self.on_event(doc, t)

    def on_response(self, doc: dict[str, Any], t: int) -> None:
        st = self.stats
        rid = doc.get("id") or ""
        if rid.startswith("s"):
            self.outstanding -= 1
            self.answered += 1
            t_sent = self.send_times.pop(rid, 0)
            if doc.get("ok"):
                self.ok += 1
                st.acked += 1
                st.last_ack = t
                if t_sent and len(st.answer_us) < MAX_LAT_SAMPLES:
                    st.answer_us.append((t - t_sent) // 1000)
                if doc["result"].get("dup"):
                    st.bump("send_dup_answers")
            else:
                st.error("send: " + str(doc.get("error", {}).get("code")))
            self.wake.set()
        elif rid.startswith("a"):
            if doc.get("ok"):
                st.bump("acks_ok")
            else:
                st.error("ack: " + str(doc.get("error", {}).get("code")))
        else:
            st.error("response with unknown id")

    def on_event(self, ev: dict[str, Any], t: int) -> None:
        st = self.stats
        kind = ev.get("kind")
        n = ev.get("n", 0)
        if not isinstance(n, int):
            st.error("event without n")
            n = 0
        # The mailbox is pushed in order with no gaps (PROTOCOL.md, "Delivery").
        if self.max_n and n != self.max_n + 1:
            st.error("inbox gap or reorder" if n > self.max_n + 1 else "inbox event repeated or reordered")
        if n > self.max_n:
            self.max_n = n
        if kind == "msg" and self.role == "recipient":
            cmid = ev.get("cmid", "")
            if not cmid.startswith(self.tag):
                st.bump("msg_events_of_other_runs")   # e.g. pushed from the mailbox backlog
            elif cmid in self.seen:
                st.dups += 1
            else:
                self.seen.add(cmid)
                st.received += 1
                st.got(t)
                try:
                    st.latency((t - int(ev["body"]["text"])) // 1000)
                except (KeyError, TypeError, ValueError):
                    st.error("msg without send time")
        else:
            st.bump(f"events_{kind}")
        if self.max_n > self.acked_n and not self.ack_scheduled:
            # Cumulative ack once per received batch, as a real client does.
            self.ack_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush_ack)

    def flush_ack(self) -> None:
        self.ack_scheduled = False
        if self.max_n <= self.acked_n or self.conn is None or self.conn.transport is None:
            return
        self.acked_n = self.max_n
        self.request(b'{"id":"a%d","op":"ack","n":%d}' % (self.acked_n, self.acked_n))
        self.stats.bump("acks_sent")

    async def run(self, t0: int) -> None:
        if self.role != "sender":
            return
        st = self.stats
        to = self.to.encode()
        tag = self.tag.encode()
        k = 0
        while k < self.count:
            conn = self.conn
            if conn is None or conn.closed.done():
                st.error("sender connection closed")
                break
            if self.rate > 0:
                due_ns = t0 + self.phase_ns + int(k * 1e9 / self.rate)
                if now_ns() < due_ns:
                    await asyncio.sleep((due_ns - now_ns()) / 1e9)
                    continue
            if self.outstanding >= self.window:
                self.wake.clear()
                await self.wake.wait()
                continue
            if not conn.writable.is_set():
                await conn.writable.wait()
            ts = now_ns()
            rid = b"s%d" % k
            doc = (b'{"id":"%s","op":"send","to":"%s","cmid":"%s-%d","body":{"type":"text","text":"%d"}}'
                   % (rid, to, tag, k, ts))
            self.send_times[rid.decode()] = ts
            self.request(doc)
            self.outstanding += 1
            self.sent += 1
            st.sent += 1
            k += 1
            if k % 32 == 0:
                await asyncio.sleep(0)
        while self.answered < self.sent and self.conn is not None and not self.conn.closed.done():
            self.wake.clear()
            await self.wake.wait()
        self.finished = True

    @property
    def done(self) -> bool:
        if self.role == "sender":
            return self.finished
        return len(self.seen) >= self.expect


# ---- worker -------------------------------------------------------------------------------

class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.mode: str = spec["mode"]
        self.host: str = spec["host"]
        self.port: int = int(spec["port"])
        self.timeout = float(spec.get("timeout", 60))
        self.connect_timeout = float(spec.get("connect_timeout", 10))
        self.idle = float(spec.get("idle", 5))
        self.concurrency = int(spec.get("concurrency", 100))
        self.stats = Stats()
        self.conns: list[Conn] = []
        self.subs: list[Subscriber] = []
        self.pubs: list[Publisher] = []
        self.ims: list[ImClient] = []
        self.groups: dict[str, Seen] = {}
        self.lines: asyncio.StreamReader | None = None

    def emit(self, doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    async def read_line(self) -> str:
        assert self.lines is not None
        line = await self.lines.readline()
        if not line:
            raise SystemExit("orchestrator went away")
        return line.decode().strip()

    async def open_client(self, c: dict[str, Any]) -> Conn:
        if self.mode == "im":
            im = ImClient(c, self.stats)
            conn = await connect(self.host, self.port, c["cid"], c.get("user"), c.get("pw"),
                                 on_message=im.on_message, timeout=self.connect_timeout)
            im.conn = conn
            await conn.subscribe([(f"roost/resp/{im.cid}", 1), (f"roost/inbox/{im.user}", 1)])
            self.ims.append(im)
            return conn
        seen = None
        if c.get("subs") and c.get("group"):
            # Members of one shared subscription: one record of what arrived, for them all.
            seen = self.groups.get(c["group"])
            if seen is None:
                seen = self.groups[c["group"]] = Seen(int(c.get("expect", 0)), int(c.get("seq_space", 1 << 20)))
        sub = Subscriber(c, self.stats, seen) if c.get("subs") else None
        pub = Publisher(c, self.stats) if c.get("pub") else None
        conn = await connect(self.host, self.port, c["cid"], c.get("user"), c.get("pw"),
                             on_message=sub.on_message if sub else None,
                             on_puback=pub.on_puback if pub else None, source=c.get("src"),
                             version=5 if c.get("v5") else 4, timeout=self.connect_timeout)
        if sub is not None:
            sub.conn = conn
            await conn.subscribe([(f, int(q)) for f, q in c["subs"]])
            self.subs.append(sub)
        if pub is not None:
            pub.conn = conn
            self.pubs.append(pub)
        return conn

    async def open_all(self) -> tuple[int, list[str]]:
        sem = asyncio.Semaphore(self.concurrency)
        errors: list[str] = []

        async def one(c: dict[str, Any]) -> None:
            async with sem:
                try:
                    self.conns.append(await self.open_client(c))
                except (TimeoutError, OSError, MqttError) as exc:
                    errors.append(f"{c['cid']}: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(c) for c in self.spec["clients"]))
        return len(self.conns), errors

    def all_done(self) -> bool:
        return (all(p.finished for p in self.pubs) and all(s.done for s in self.subs)
                and all(i.done for i in self.ims))

    def last_activity(self, t0: int) -> int:
        return max(t0, self.stats.last_recv, self.stats.last_ack)

    async def run_load(self, t0: int) -> bool:
        """Returns True when it ended by timeout rather than completion or idleness."""
        tasks = [asyncio.create_task(p.run(t0)) for p in self.pubs]
        tasks += [asyncio.create_task(i.run(t0)) for i in self.ims]
        deadline = t0 + int(self.timeout * 1e9)
        timed_out = False
        try:
            while not self.all_done():
                now = now_ns()
                if now > deadline:
                    timed_out = True
                    break
                if now - self.last_activity(t0) > self.idle * 1e9:
                    break
                await asyncio.sleep(0.02)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return timed_out

    async def main(self) -> None:
        raise_nofile()
        loop = asyncio.get_running_loop()
        self.lines = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self.lines), sys.stdin)
        result: dict[str, Any] = {"event": "result"}
        if self.mode == "hold":
            self.emit({"event": "ready"})
            t0 = int((await self.read_line()).split()[1])
            await asyncio.sleep(max(0, (t0 - now_ns()) / 1e9))
            cpu0 = cpu_seconds()
            connected, errors = await self.open_all()
            t1 = now_ns()
            self.emit({"event": "connected", "connected": connected, "errors": errors[:20],
                       "error_count": len(errors), "connect_s": (t1 - t0) / 1e9,
                       "cpu_s": cpu_seconds() - cpu0, "wall_s": (t1 - t0) / 1e9})
            await self.read_line()  # "stop"
            alive = sum(1 for c in self.conns if not c.closed.done())
            result.update(alive=alive)
        else:
            connected, errors = await self.open_all()
            result.update(connected=connected, connect_errors=errors[:20], connect_error_count=len(errors))
            self.emit({"event": "ready", "connected": connected, "error_count": len(errors)})
            t0 = int((await self.read_line()).split()[1])
            await asyncio.sleep(max(0, (t0 - now_ns()) / 1e9))
            cpu0 = cpu_seconds()
            timed_out = await self.run_load(t0)
            t1 = now_ns()
            st = self.stats
            result.update(
                timed_out=timed_out, sent=st.sent, acked=st.acked, received=st.received, dups=st.dups,
                expected=sum(seen.expect for seen in {id(s.seen): s.seen for s in self.subs}.values())
                + sum(i.expect for i in self.ims),
                first_recv=st.first_recv, last_recv=st.last_recv, last_ack=st.last_ack, t0=t0,
                lat_us=st.lat_us.tolist(), answer_us=st.answer_us.tolist(), errors=st.errors, extra=st.extra,
                cpu_s=cpu_seconds() - cpu0,
                wall_s=(max(st.last_recv, st.last_ack, st.last_send, t0) - t0) / 1e9,
                active_wall_s=(t1 - t0) / 1e9)
        for c in self.conns:
            c.close()
        await asyncio.sleep(0.05)
        self.emit(result)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    try:
        import uvloop  # type: ignore[import-not-found]
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(Worker(spec).main())


if __name__ == "__main__":
    main()

"""The web app in a real browser (issue 14, item 7): headless Chromium (Debian's
package, through Playwright; tests/browser.py) against a real broker subprocess,
with MQTT clients and the `roost` CLI of the same people beside it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.sync_api import expect

from devices.simulators import png_image
from tests.browser import browser, sign_in
from tests.clients import ImClient
from tests.harness import ROOT, RoostProcess, free_port


def web_broker(roost_factory: Callable[..., RoostProcess]) -> tuple[RoostProcess, str]:
    port = free_port()
    broker = roost_factory({"listeners": {"web": {"type": "http", "bind": f"127.0.0.1:{port}"}}})
    return broker, f"http://127.0.0.1:{port}"


def wait_until(fn: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout}s")


def unread_of(client: ImClient, conv: str) -> tuple[int, int]:
    r = client.call("convs")
    mine = [c["unread"] for c in r["convs"] if c["conv"] == conv]
    return (mine[0] if mine else 0), r["total_unread"]


def cli_unread(broker: RoostProcess, home: Path, user: str, password: str, conv: str) -> tuple[int, int]:
    """`roost convs --json` of `user`, logged in from its own folders: (that conversation's unread, total)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    env.update(XDG_CONFIG_HOME=str(home / user / "config"), XDG_STATE_HOME=str(home / user / "state"), NO_COLOR="1")

    def roost(*args: str, stdin: str | None = None) -> str:
        res = subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=str(ROOT), env=env, input=stdin,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout

    if not (home / user / "config").exists():
        roost("login", "--server", f"{broker.host}:{broker.port}", "--password-stdin", user, stdin=password + "\n")
    doc = json.loads(roost("convs", "--json"))
    mine = [c["unread"] for c in doc["convs"] if c["conv"] == conv]
    return (mine[0] if mine else 0), doc["total_unread"]


def test_two_people_chat_in_the_browser_with_an_mqtt_client_beside(roost_factory, tmp_path: Path) -> None:
    broker, base = web_broker(roost_factory)
    broker.add_user("alice", "alice-pw", name="Alice")
    broker.add_user("bob", "bob-pw", name="Bob")
    conv = "dm:alice:bob"
    with browser() as chromium:
        alice = chromium.new_context(viewport={"width": 1280, "height": 800}).new_page()
        bob = chromium.new_context(viewport={"width": 390, "height": 760}).new_page()   # a phone
        errors: list[str] = []
        for page in (alice, bob):
            page.on("pageerror", lambda e: errors.append(str(e)))
        sign_in(alice, base, "alice", "alice-pw")
        sign_in(bob, base, "bob", "bob-pw", keyboard=True)

        # befriend: alice asks from the People view, bob accepts there
        alice.get_by_role("button", name="People").click()
        alice.get_by_label("Person id").fill("bob")
        alice.get_by_label("Note").fill("it's Alice")
        alice.get_by_role("button", name="Add contact").click()
        expect(alice.get_by_text("Waiting for bob to accept")).to_be_visible()
        bob.get_by_role("button", name="People").click()
        bob.get_by_role("button", name="Accept alice").click()
        expect(alice.locator("#contacts [data-contact=bob]")).to_contain_text("online")

        # bob's phone (MQTT, as the CLI) is a second device of bob
        phone = ImClient("bob", "phone").open(broker, "bob-pw")
        history = ImClient("alice", "script").open(broker, "alice-pw", subscribe_inbox=False)
        for i in range(1, 121):
            history.call("send", to="bob", cmid=f"old-{i}", body={"type": "text", "text": f"old {i}"})
        history.disconnect()

        # alice writes from the page: Enter sends, Shift+Enter is a new line
        alice.get_by_role("button", name="Write to bob").click()
        box = alice.get_by_role("textbox", name="Message")
        box.fill("hello bob")
        box.press("Shift+Enter")
        box.type("second line")
        box.press("Enter")
        mine = alice.get_by_role("log", name="Messages").locator("li.mine").last
        expect(mine.locator(".msg-text")).to_have_text("hello bob\nsecond line")
        expect(box).to_have_value("")

        # bob's list: 121 unread, the same numbers his phone is told and `convs` answers
        bob.get_by_role("button", name="Chat", exact=True).click()
        expect(bob.get_by_role("list", name="Conversations")).to_be_visible()
        item = bob.locator(f"#convs li[data-conv='{conv}']")   # found while hidden too (the phone's thread)
        expect(item).to_have_attribute("data-unread", "121")
        expect(bob.locator("#convs-total")).to_have_attribute("data-total", "121")
        assert unread_of(phone, conv) == (121, 121)

        # opening the thread (by keys alone) shows the newest page and reads it: cleared everywhere
        item.get_by_role("button").focus()
        bob.keyboard.press("Enter")
        expect(bob.get_by_role("textbox", name="Message")).to_be_focused()
        thread = bob.get_by_role("log", name="Messages")
        expect(thread.locator("li").last.locator(".msg-text")).to_have_text("hello bob\nsecond line")
        assert thread.locator("li").count() <= 60
        expect(item).to_have_attribute("data-unread", "0")
        phone.wait_event("unread", conv=conv, count=0, total=0)
        wait_until(lambda: unread_of(phone, conv) == (0, 0), "the phone's convs cleared")
        expect(mine.locator(".mark")).to_have_attribute("data-mark", "read")

        # scrolling up loads older pages until the very first message
        def scrolled_to_start() -> bool:
            thread.evaluate("el => { el.scrollTop = 0; el.dispatchEvent(new Event('scroll')); }")
            return thread.locator("li").first.inner_text().startswith("Alice\nold 1\n")
        wait_until(scrolled_to_start, "history paged back to the first message", timeout=20)
        assert thread.locator("li").count() == 121

        # the phone writes: bob's page shows it at once as his own; alice reads it
        phone.call("send", conv=conv, cmid="p1", body={"type": "text", "text": "from my phone"})
        expect(thread.locator("li.mine .msg-text").last).to_have_text("from my phone")
        expect(alice.get_by_role("log", name="Messages").locator("li:not(.mine) .msg-text").last) \
            .to_have_text("from my phone")

        # bob goes back to the list; alice sends; his phone reads: the page's count follows live
        bob.get_by_role("button", name="Back").click()
        alice.get_by_role("button", name="Chat", exact=True).click()
        for text in ("<script>window.pwned = 1</script>", '<img src=x onerror="window.pwned = 2">'):
            box.fill(text)
            alice.get_by_role("button", name="Send").click()
            expect(mine.locator(".msg-text")).to_have_text(text)
        expect(item).to_have_attribute("data-unread", "2")
        assert unread_of(phone, conv) == (2, 2)
        assert cli_unread(broker, tmp_path, "bob", "bob-pw", conv) == (2, 2)   # the CLI on a third device
        seq = phone.call("convs")["convs"][0]["last_seq"]
        phone.call("read", conv=conv, seq=seq)
        expect(item).to_have_attribute("data-unread", "0")
        assert cli_unread(broker, tmp_path, "bob", "bob-pw", conv) == (0, 0)

        # hostile text renders as typed, inert
        item.get_by_role("button").click()
        texts = thread.locator("li:not(.mine) .msg-text")
        expect(texts.last).to_have_text('<img src=x onerror="window.pwned = 2">')
        expect(texts.nth(texts.count() - 2)).to_have_text("<script>window.pwned = 1</script>")
        assert thread.locator("img, script").count() == 0
        assert bob.evaluate("window.pwned") is None and alice.evaluate("window.pwned") is None

        # a group: created, written to, a member removed (his list follows live); search; profile
        alice.get_by_role("button", name="People", exact=True).click()
        alice.get_by_label("Group name").fill("Home")
        alice.get_by_label("Members (ids, comma-separated)").fill("bob")
        alice.get_by_role("button", name="Create group").click()
        expect(alice.locator("#thread-title")).to_have_text("Home")
        alice.get_by_role("textbox", name="Message").fill("hi all")
        alice.get_by_role("textbox", name="Message").press("Enter")
        group_item = bob.locator("#convs li", has_text="Home")
        expect(group_item).to_have_attribute("data-unread", "1")
        alice.get_by_role("button", name="Members").click()
        alice.get_by_role("button", name="Remove bob").click()
        expect(group_item).to_have_count(0)
        bob.get_by_role("button", name="People", exact=True).click()
        bob.get_by_label("Name or id").fill("Ali")
        bob.get_by_role("button", name="Search").click()
        expect(bob.get_by_role("list", name="Search results")).to_contain_text("Alice (alice)")
        alice.get_by_role("button", name="People", exact=True).click()
        alice.get_by_label("Status").fill("<b>at home</b>")
        alice.get_by_role("button", name="Save profile").click()
        expect(alice.locator("#profile-saved")).to_have_text("Saved.")
        assert phone.call("profile.get", user="alice")["status"] == "<b>at home</b>"
        bob.get_by_role("button", name="Chat", exact=True).click()
        alice.get_by_role("button", name="Chat", exact=True).click()
        alice.locator(f"#convs li[data-conv='{conv}'] button").click()

        # a picture: attached on alice's page, shown inline on bob's, the reference on his phone
        png = png_image(24, 16, lambda x, y: (200, 40 + 8 * x, 10 * y))
        hostile = '<img src=x onerror="window.pwned=3">.png'   # a file name is text too
        alice.locator("#attach").set_input_files({"name": hostile, "mimeType": "image/png", "buffer": png})
        picture = thread.locator("li:not(.mine) img").last
        expect(picture).to_have_attribute("alt", hostile)
        expect(thread.locator("li:not(.mine) .msg-file").last).to_contain_text(hostile)
        expect(picture).to_have_attribute("src", re.compile(r"^/files/[0-9a-f]{64}$"))   # broker/web/files.py
        wait_until(lambda: picture.evaluate("img => img.complete && img.naturalWidth") == 24, "the picture loaded")
        pushed = phone.wait_event("msg", conv=conv, **{"from": "alice"})
        while pushed["body"]["type"] != "file":
            pushed = phone.wait_event("msg", conv=conv, **{"from": "alice"})
        assert pushed["body"]["name"] == hostile and pushed["body"]["size"] == len(png)
        assert thread.locator("img").count() == 1 and bob.evaluate("window.pwned") is None

        # blocking from the page: bob's phone is refused as a stranger; unblocking lifts it
        alice.get_by_role("button", name="People", exact=True).click()
        alice.get_by_role("button", name="Block bob").click()
        expect(alice.locator("#contacts [data-blocked=bob]")).to_be_visible()
        refused = phone.request("send", conv=conv, cmid="p2", body={"type": "text", "text": "still there?"})
        assert refused["error"]["code"] == "forbidden"
        alice.get_by_role("button", name="Unblock bob").click()
        expect(alice.locator("#contacts [data-blocked=bob]")).to_have_count(0)
        phone.disconnect()
        assert not errors, errors


def test_devices_in_the_browser(roost_factory) -> None:
    from devices.sdk import Device
    from devices.simulators import DoorSensor, Light, Thermostat

    broker, base = web_broker(roost_factory)
    broker.add_user("alice", "alice-pw", name="Alice")
    broker.add_user("bob", "bob-pw", name="Bob")
    made = {d: broker.add_device(d, kind, name=name, room="hall")
            for d, kind, name in (("hall-light", "light", "Hall light"), ("thermo", "thermostat", "Thermostat"),
                                  ("front-door", "door_sensor", "Front door"))}
    a = ImClient("alice", "setup").open(broker, "alice-pw")
    b = ImClient("bob", "setup").open(broker, "bob-pw")
    a.call("contact.request", to="bob")
    b.call("contact.accept", **{"from": "alice"})
    for device in ("thermo", "front-door"):
        a.call("device.claim", device=device, code=made[device][1])
    sims: list[Any] = []
    try:
        for device, cls in (("hall-light", Light), ("thermo", Thermostat), ("front-door", DoorSensor)):
            dev = Device(device, made[device][0], broker.host, broker.port, kind=cls.kind)
            sims.append(cls(dev) if cls is not DoorSensor else DoorSensor(dev, toggle_every=0))
            dev.start()
        light, thermo, door = sims
        thermo.tick(1.0)
        with browser() as chromium:
            page = chromium.new_context(viewport={"width": 1280, "height": 900}).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            sign_in(page, base, "alice", "alice-pw")
            page.get_by_role("button", name="Devices", exact=True).click()
            area = page.get_by_role("region", name="Devices")
            expect(area).to_be_visible()

            # claim the light with its pairing code
            area.get_by_label("Device id").fill("hall-light")
            area.get_by_label("Pairing code").fill(made["hall-light"][1])
            area.get_by_role("button", name="Claim").click()
            card = area.locator(".device[data-device='hall-light']")
            expect(card).to_contain_text("Hall light")
            expect(card).to_contain_text("online")

            # switch it on from the page: the simulated light is on, the result shows
            card.get_by_role("button", name="Turn Hall light on").click()
            expect(card.locator(".result")).to_have_attribute("data-status", "ok")
            expect(card.locator(".result")).to_contain_text("turn_on: ok")
            wait_until(lambda: light.on, "the light switched on")
            expect(card.locator("[data-field=on] dd")).to_have_text("yes")

            # the thermostat's telemetry moves its chart, live
            chart = area.locator(".device[data-device='thermo'] canvas.chart")
            expect(chart).not_to_have_attribute("data-points", "0")
            before = int(chart.get_attribute("data-points") or 0)
            thermo.temperature = 30.5
            thermo.publish()
            expect(chart).to_have_attribute("data-last", "30.5")
            assert int(chart.get_attribute("data-points") or 0) == before + 1
            tcard = area.locator(".device[data-device='thermo']")
            tcard.get_by_label("Thermostat set-point", exact=True).fill("23.5")
            tcard.get_by_role("button", name="Set Thermostat set-point").click()
            expect(tcard.locator(".result")).to_contain_text("set_setpoint: ok")
            wait_until(lambda: thermo.setpoint == 23.5, "the set point reached the thermostat")

            # the door sensor's events appear on its card
            door.device.submit(door.toggle)
            expect(area.locator(".device[data-device='front-door'] .device-events li").first) \
                .to_contain_text("opened")

            # share the light with bob: his page shows its card without a reload
            bob = chromium.new_context(viewport={"width": 390, "height": 760}).new_page()
            sign_in(bob, base, "bob", "bob-pw")
            bob.get_by_role("button", name="Devices", exact=True).click()
            expect(bob.get_by_text("No devices yet")).to_be_visible()
            card.get_by_label("Share hall-light with").select_option("bob")
            card.get_by_role("button", name="Share").click()
            expect(bob.locator(".device[data-device='hall-light']")).to_contain_text("sharee")
            card.get_by_role("button", name="Unshare hall-light from bob").click()
            expect(bob.locator(".device[data-device='hall-light']")).to_have_count(0)
            assert not errors, errors
    finally:
        for sim in sims:
            sim.device.stop()
        a.disconnect()
        b.disconnect()

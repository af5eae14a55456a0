"""Person-side social commands: contacts, contact requests, search, profiles,
presence and groups."""

from __future__ import annotations

import time
from typing import Any

import click

from client.cli_common import (
    ConnectionWatch,
    Net,
    command,
    contact_ids,
    group,
    network,
    nonblank_arg,
    principal_arg,
    print_presence,
    stream_label,
    subscribe_presence,
)
from client.output import (
    EXIT_USAGE,
    UNKNOWN,
    CliError,
    Column,
    fmt_seen,
    fmt_value,
    presence_colour,
    presence_state,
    presence_text,
)
from client.sdk import ReconnectedItem, RoostClient, TopicItem
from contract import topics
from contract.ids import parse_conv


@command()
@network()
def contacts(net: Net) -> None:
    """List your contacts with their presence.

    \b
    Example:
      roost contacts
    """
    client = net.open(inbox=False)
    res = client.call("contacts")
    if net.json_mode:
        net.out.doc(res)
        return
    out = net.out
    out.table(res.get("contacts") or [], [
        Column("id", "id"), Column("kind", "kind"), Column("name", "name"),
        Column("presence", "presence", presence_text, colour=presence_colour),
    ], empty="no contacts yet (`roost contact request ID` asks someone)")
    # Pending requests and blocks are extensions some brokers add to the result.
    for r in res.get("incoming") or []:
        if isinstance(r, dict):
            note = f' "{r["note"]}"' if r.get("note") else ""
            out.line(f"request from {r.get('from')}{note} (roost contact accept {r.get('from')})", fg="magenta")
    for r in res.get("outgoing") or []:
        if isinstance(r, dict):
            out.line(f"waiting for {r.get('to')} to accept", fg="bright_black")
    blocked = [str(b) for b in res.get("blocked") or []]
    if blocked:
        out.line(f"blocked: {', '.join(blocked)}", fg="bright_black")


@group()
def contact() -> None:
    """Ask, accept, reject, remove, block and unblock contacts.

    \b
    Example:
      roost contact request bob --note "it's Alice from next door"
      roost contact accept alice
    """


def _contact_cmd(action: str, op: str, param: str, done: str, help_text: str) -> click.Command:
    @click.argument("user_id", metavar="ID")
    @network()
    def cmd(net: Net, user_id: str, note: str | None = None) -> None:
        principal_arg(user_id)
        client = net.open(inbox=False)
        params: dict[str, Any] = {param: user_id}
        if note:
            params["note"] = note
        res = client.call(op, params)
        if net.json_mode:
            net.out.doc({"ok": True, "action": action, "user": user_id, "result": res})
        else:
            net.out.line(done.format(id=user_id))

    cmd.__doc__ = help_text
    if action == "request":
        cmd = click.option("--note", metavar="TEXT", help="A note the other person sees with the request.")(cmd)
    return contact.command(action)(cmd)


_contact_cmd("request", "contact.request", "to", "contact request sent to {id}",
             "Ask ID to become a contact.\n\n\b\nExample:\n  roost contact request bob --note \"hi, it's Alice\"")
_contact_cmd("accept", "contact.accept", "from", "{id} is now a contact",
             "Accept ID's contact request.\n\n\b\nExample:\n  roost contact accept alice")
_contact_cmd("reject", "contact.reject", "from", "rejected {id}'s request",
             "Reject ID's contact request.\n\n\b\nExample:\n  roost contact reject mallory")
_contact_cmd("remove", "contact.remove", "user", "{id} is no longer a contact",
             "Remove ID from your contacts.\n\n\b\nExample:\n  roost contact remove bob")
_contact_cmd("block", "contact.block", "user", "blocked {id}",
             "Block ID: their requests and messages no longer reach you.\n\n\b\nExample:\n  roost contact block mallory")
_contact_cmd("unblock", "contact.unblock", "user", "unblocked {id}",
             "Unblock ID.\n\n\b\nExample:\n  roost contact unblock mallory")


NAME_SEARCH_MIN = 2   # PROTOCOL.md, user.search: a name prefix of at least 2 characters


@command()
@click.argument("query")
@network()
def search(net: Net, query: str) -> None:
    """Find people by exact id or by the start of their name (2+ characters).

    \b
    Examples:
      roost search bob
      roost search "Ali"
    """
    nonblank_arg(query, "QUERY")
    client = net.open(inbox=False)
    res = client.call("user.search", {"q": query})
    if not res.get("users") and len(query.strip()) < NAME_SEARCH_MIN:
        # One character is searched as an exact id only; say so rather than "nobody matches".
        raise CliError(f"nobody has the id '{query}', and a name search needs at least {NAME_SEARCH_MIN} characters",
                       EXIT_USAGE)
    if net.json_mode:
        net.out.doc(res)
        return
    net.out.table(res.get("users") or [], [Column("id", "id"), Column("kind", "kind"), Column("name", "name")],
                  empty=f"nobody matches '{query}'")


@command()
@click.argument("user_id", metavar="[ID]", required=False)
@click.option("--name", metavar="NAME", help="Set your display name.")
@click.option("--status", metavar="TEXT", help="Set your status text.")
@network()
def profile(net: Net, user_id: str | None, name: str | None, status: str | None) -> None:
    """Show a profile (yours by default), or set your name and status.

    \b
    Examples:
      roost profile
      roost profile bob
      roost profile --name "Alice M." --status "in the garden"
    """
    if name is not None:
        nonblank_arg(name, "--name")   # --status "" is fine: it clears the status
    if user_id is not None:
        principal_arg(user_id)
        if name is not None or status is not None:
            raise click.UsageError("--name/--status change your own profile; leave out ID")
    client = net.open(inbox=False)
    if name is not None or status is not None:
        params = {k: v for k, v in (("name", name), ("status", status)) if v is not None}
        res = client.call("profile.set", params)
    else:
        res = client.call("profile.get", {"user": user_id or net.me})
    if net.json_mode:
        net.out.doc(res)
    else:
        net.out.kv([("user", res.get("user")), ("kind", res.get("kind")), ("name", res.get("name")),
                    ("status", res.get("status"))])


@command()
@click.argument("ids", metavar="[ID]...", nargs=-1)
@click.option("--follow", "-f", is_flag=True, help="Keep watching and print every change.")
@click.option("--wait", default=2.0, show_default=True, type=click.FloatRange(0.1, 30),
              help="Seconds to wait for the retained state of each id.")
@network(stream=True)
def presence(net: Net, ids: tuple[str, ...], follow: bool, wait: float) -> None:
    """Show who is online (you and your contacts by default).

    Reads the retained roost/presence/<id> of each id; ids you may not see are
    reported as such.

    \b
    Examples:
      roost presence
      roost presence bob thermo1 --follow
    """
    for i in ids:
        principal_arg(i)
    me = net.me
    # Following is being there (counts as online); a one-off look is not.
    client = net.open(label=stream_label("presence") if follow else None, inbox=False)
    wanted = list(dict.fromkeys(ids or [me, *contact_ids(client)]))
    grants = subscribe_presence(client, wanted)
    states: dict[str, Any] = {}
    deadline = time.monotonic() + wait
    pending = {i for i in wanted if grants.get(i)}
    while pending and time.monotonic() < deadline:
        try:
            item = client.items.get(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:
            break
        if isinstance(item, TopicItem):
            pid = topics.tail(item.topic, topics.PRESENCE)
            if pid in pending:
                states[pid] = item.payload
                pending.discard(pid)
    rows = [presence_row(i, bool(grants.get(i)), states.get(i)) for i in wanted]
    out = net.out
    if net.json_mode:
        if follow:
            for r in rows:
                out.jsonl({"kind": "presence", **r})
        else:
            out.doc({"presence": rows})
    else:
        out.table([{**r, "state": presence_state(r)} for r in rows], [
            Column("id", "id"),
            Column("state", "state", fmt_value, colour=presence_colour),
            Column("clients", "clients", align_right=True),
            Column("since", "since", fmt_seen),
            Column("last_seen", "last seen", fmt_seen),
        ])
    if not follow:
        return
    watch = ConnectionWatch(client, out)
    while True:
        try:
            item = client.items.get(timeout=1.0)
        except Exception:
            watch.check()
            continue
        if isinstance(item, TopicItem):
            pid = topics.tail(item.topic, topics.PRESENCE)
            if pid is None or (item.retained and states.get(pid) == item.payload):
                continue
            states[pid] = item.payload
            if net.json_mode:   # a change arrived, so the id is visible; same shape as the first lines
                out.jsonl({"kind": "presence", **presence_row(pid, True, item.payload)})
            else:
                print_presence(net, pid, item.payload)
        elif isinstance(item, ReconnectedItem):
            watch.reconnected()
        watch.check()


PRESENCE_FIELDS = ("state", "clients", "since", "last_seen")


def presence_row(principal: str, visible: bool, payload: Any) -> dict[str, Any]:
    """One id's line of `roost presence`, always with the same keys (docs/CLI.md):
    id, visible and the presence fields (null when there is no retained state)."""
    row: dict[str, Any] = {"id": principal, "visible": visible, **dict.fromkeys(PRESENCE_FIELDS)}
    if isinstance(payload, dict):
        row.update(payload)
    else:
        row["state"] = UNKNOWN if visible else "not visible"
    return row


@group("group")
def group_cmd() -> None:
    """Create and manage group conversations.

    \b
    Example:
      roost group create "Family" bob carol
      roost group info grp:k3x9
    """


@group_cmd.command("create")
@click.argument("name")
@click.argument("members", metavar="MEMBER...", nargs=-1, required=True)
@network()
def group_create(net: Net, name: str, members: tuple[str, ...]) -> None:
    """Create a group NAME with you and MEMBERs; prints its conversation id.

    \b
    Example:
      roost group create "Family" bob carol
    """
    nonblank_arg(name, "NAME")
    for m in members:
        principal_arg(m, "MEMBER")
    client = net.open(inbox=False)
    res = client.call("group.create", {"name": name, "members": list(members)})
    if net.json_mode:
        net.out.doc(res)
    else:
        net.out.line(f"created {res.get('conv')}")


def _group_members_cmd(action: str, verb: str) -> None:
    help_text = (f"{action.capitalize()} MEMBERs {'to' if action == 'add' else 'from'} the group CONV.\n\n"
                 f"\b\nExample:\n  roost group {action} grp:k3x9 dave")

    @group_cmd.command(action, help=help_text)
    @click.argument("conv", metavar="CONV")
    @click.argument("members", metavar="MEMBER...", nargs=-1, required=True)
    @network()
    def cmd(net: Net, conv: str, members: tuple[str, ...]) -> None:
        _check_group(conv)
        for m in members:
            principal_arg(m, "MEMBER")
        client = net.open(inbox=False)
        res = client.call(f"group.{action}", {"conv": conv, "members": list(members)})
        if net.json_mode:
            net.out.doc({"ok": True, "conv": conv, action: list(members), "result": res})
        else:
            net.out.line(f"{verb} {', '.join(members)}")



_group_members_cmd("add", "added")
_group_members_cmd("remove", "removed")


def _check_group(conv: str) -> None:
    parsed = parse_conv(conv)
    if parsed is None or parsed[0] != "grp":
        raise click.BadParameter(f"'{conv}' is not a group conversation id (grp:<id>)", param_hint="CONV")


@group_cmd.command("leave")
@click.argument("conv", metavar="CONV")
@network()
def group_leave(net: Net, conv: str) -> None:
    """Leave the group CONV.

    \b
    Example:
      roost group leave grp:k3x9
    """
    _check_group(conv)
    client = net.open(inbox=False)
    res = client.call("group.leave", {"conv": conv})
    if net.json_mode:
        net.out.doc({"ok": True, "conv": conv, "result": res})
    else:
        net.out.line(f"left {conv}")


@group_cmd.command("list")
@network()
def group_list(net: Net) -> None:
    """List the groups you are in, with their members.

    \b
    Examples:
      roost group list
      roost group list --json | jq -r '.groups[].conv'
    """
    client = net.open(inbox=False)
    convs = client.call("convs").get("convs") or []
    groups = [c for c in convs if isinstance(c, dict) and c.get("kind") == "group" and isinstance(c.get("conv"), str)]
    rows = [_group_row(client, c) for c in groups]
    if net.json_mode:
        net.out.doc({"groups": rows})
        return
    net.out.table(rows, [
        Column("conv", "conv"), Column("name", "name"),
        Column("members", "members", lambda v: ", ".join(v or [])),
        Column("unread", "unread", align_right=True),
    ], empty="no groups yet (`roost group create NAME MEMBER...` makes one)")


def _group_row(client: RoostClient, conv: dict[str, Any]) -> dict[str, Any]:
    """One line of `group list`: `convs` has the name and unread count, `group.info` the members."""
    info = client.call("group.info", {"conv": conv["conv"]})
    members = [m.get("id") if isinstance(m, dict) else m for m in info.get("members") or []]
    return {"conv": conv["conv"], "name": info.get("name", conv.get("name")),
            "members": [str(m) for m in members], "unread": conv.get("unread", 0)}


@group_cmd.command("info")
@click.argument("conv", metavar="CONV")
@network()
def group_info(net: Net, conv: str) -> None:
    """Show a group's name and members.

    \b
    Example:
      roost group info grp:k3x9
    """
    _check_group(conv)
    client = net.open(inbox=False)
    res = client.call("group.info", {"conv": conv})
    if net.json_mode:
        net.out.doc(res)
        return
    members = res.get("members") or []
    names = [m.get("id", fmt_value(m)) if isinstance(m, dict) else str(m) for m in members]
    net.out.kv([("conv", res.get("conv")), ("name", res.get("name")), ("members", ", ".join(names))])


COMMANDS: list[click.Command] = [contacts, contact, search, profile, presence, group_cmd]

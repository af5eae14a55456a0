"""Who may observe whom: an in-memory index of relationships, for fast ACL checks.

The ACL runs on every subscribe and every delivery of `roost/presence/...` and
`roost/telemetry/...`, so it cannot ask the database. The services that own the
relationships (contacts, groups, device ownership) load them at start and update
this index whenever they commit a change; the ACL only reads it.
"""

from __future__ import annotations

from collections import defaultdict


class Relations:
    def __init__(self) -> None:
        self._contacts: dict[str, set[str]] = defaultdict(set)        # accepted, symmetric
        self._groups_of: dict[str, set[str]] = defaultdict(set)       # principal -> group ids
        self._members: dict[str, set[str]] = {}                       # group id -> principals
        self._device_users: dict[str, set[str]] = defaultdict(set)    # device -> owners + sharees
        self._devices_of: dict[str, set[str]] = defaultdict(set)      # principal -> devices
        self.integration_account: str | None = None                   # HA service account
        self.generation = 0  # bumped on every change; ACL caches key on it

    # ---- writers (called by the owning services after commit) ------------
    def set_contact(self, a: str, b: str, accepted: bool) -> None:
        if accepted:
            self._contacts[a].add(b)
            self._contacts[b].add(a)
        else:
            self._contacts[a].discard(b)
            self._contacts[b].discard(a)
        self.generation += 1

    def set_group(self, group_id: str, members: set[str]) -> None:
        for p in self._members.get(group_id, set()):
            self._groups_of[p].discard(group_id)
        if members:
            self._members[group_id] = set(members)
            for p in members:
                self._groups_of[p].add(group_id)
        else:
            self._members.pop(group_id, None)
        self.generation += 1

    def set_device_users(self, device: str, users: set[str]) -> None:
        for p in self._device_users.get(device, set()):
            self._devices_of[p].discard(device)
        self._device_users[device] = set(users)
        for p in users:
            self._devices_of[p].add(device)
        self.generation += 1

    def forget_principal(self, principal: str) -> None:
        for other in self._contacts.pop(principal, set()):
            self._contacts[other].discard(principal)
        for gid in self._groups_of.pop(principal, set()):
            self._members.get(gid, set()).discard(principal)
        for dev in self._devices_of.pop(principal, set()):
            self._device_users[dev].discard(principal)
        for p in self._device_users.pop(principal, set()):
            self._devices_of[p].discard(principal)
        self.generation += 1

    # ---- readers ---------------------------------------------------------
    def are_contacts(self, a: str, b: str) -> bool:
        return b in self._contacts.get(a, ())

    def share_group(self, a: str, b: str) -> bool:
        ga = self._groups_of.get(a)
        gb = self._groups_of.get(b)
        return bool(ga and gb and not ga.isdisjoint(gb))

    def may_use_device(self, principal: str, device: str) -> bool:
        return principal in self._device_users.get(device, ())

    def device_users(self, device: str) -> set[str]:
        return set(self._device_users.get(device, ()))

    def devices_of(self, principal: str) -> set[str]:
        return set(self._devices_of.get(principal, ()))

    def contacts_of(self, principal: str) -> set[str]:
        return set(self._contacts.get(principal, ()))

    def group_members(self, group_id: str) -> set[str]:
        return set(self._members.get(group_id, ()))

    def may_know_device(self, viewer: str, device: str) -> bool:
        """May `viewer` know that the device (or service account) `device` exists:
        the rule `profile.get` applies (PROTOCOL.md, Contacts, search, profiles).
        Ops that name a device answer one the viewer may not know exactly as an
        unknown id (`not_found`), never `forbidden`, which would reveal it."""
        return (
            viewer == device
            or self.share_group(viewer, device)
            or self.may_use_device(viewer, device)
            or (self.integration_account is not None and viewer == self.integration_account
                and bool(self._device_users.get(device)))
        )

    def can_observe(self, viewer: str, target: str) -> bool:
        """May `viewer` see `target`'s presence (PROTOCOL.md, Topics)."""
        return (
            viewer == target
            or self.are_contacts(viewer, target)
            or self.share_group(viewer, target)
            or self.may_use_device(viewer, target)
            or (self.integration_account is not None and viewer == self.integration_account
                and target in self._device_users)
        )

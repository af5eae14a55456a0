"""How the CLI talks to people and to scripts.

People get tables, short lines and colour (only on a terminal, never with NO_COLOR
or TERM=dumb). Scripts get `--json`: one JSON document per command, or one JSON
object per line for streams (`listen`, `chat`, `--follow`). Errors are one line
on stderr, and the exit code says what kind of failure it was (see EXIT_*).
Progress for long waits goes to stderr, only when stderr is a terminal.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any, TextIO

import click

# Exit codes (docs/CLI.md, "Exit codes").
EXIT_OK = 0
EXIT_SERVER_ERROR = 1      # the server answered with an error (forbidden, not_found, ...)
EXIT_USAGE = 2             # bad arguments (click's own code)
EXIT_CONNECT = 3           # cannot connect, login refused, not logged in
EXIT_TIMEOUT = 4           # no answer in time (request, device result)
EXIT_DEVICE_ERROR = 5      # `roost cmd`: the device answered status "error"
EXIT_INTERRUPTED = 130     # Ctrl-C during a one-shot command
EXIT_INTERNAL = 70         # a bug (ROOST_DEBUG=1 shows the traceback)


class CliError(click.ClickException):
    """A failure shown as one line on stderr, with a chosen exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_SERVER_ERROR) -> None:
        super().__init__(message)
        # click declares exit_code a class constant; a CliError's code is chosen per error.
        self.exit_code = exit_code  # type: ignore[misc]

    def show(self, file: IO[Any] | None = None) -> None:
        err = file or sys.stderr
        prefix = style("roost: error:", fg="red", bold=True, stream=err)
        click.echo(f"{prefix} {self.format_message()}", file=err)


def use_color(stream: IO[Any]) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def style(text: str, *, stream: IO[Any] | None = None, **kw: Any) -> str:
    return click.style(text, **kw) if use_color(stream or sys.stdout) else text


def fmt_time(ts: Any, *, date: bool | None = None) -> str:
    """Unix seconds -> local `HH:MM:SS`, with the date when not today (or when asked)."""
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "-"
    t = time.localtime(ts)
    if date is None:
        date = time.strftime("%Y-%m-%d", t) != time.strftime("%Y-%m-%d")
    return time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", t)


def fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    return str(v)


def fmt_kv(d: Any) -> str:
    """`{"a": 1, "b": "x"}` -> `a=1 b=x` (ts shown as a time)."""
    if not isinstance(d, dict) or not d:
        return "-" if not d else fmt_value(d)
    parts = []
    for k, v in d.items():
        parts.append(f"{k}={fmt_time(v) if k == 'ts' else fmt_value(v)}")
    return " ".join(parts)


def render_body(body: Any) -> str:
    """A message body as one line for people."""
    if not isinstance(body, dict):
        return fmt_value(body)
    kind = body.get("type")
    if kind == "text":
        return str(body.get("text", ""))
    if kind == "command":
        args = body.get("args") or {}
        return f"[command] {body.get('name', '?')}" + (f" {fmt_kv(args)}" if args else "")
    if kind == "result":
        data = body.get("data") or {}
        return f"[result for #{body.get('for', '?')}] {body.get('status', '?')}" + (f" {fmt_kv(data)}" if data else "")
    if kind == "event":
        data = body.get("data") or {}
        return f"[event] {body.get('name', '?')}" + (f" {fmt_kv(data)}" if data else "")
    if kind == "file":
        size = body.get("size")
        sized = f" ({fmt_size(size)})" if isinstance(size, int) and not isinstance(size, bool) else ""
        return f"[file] {body.get('name', '')}{sized} id {body.get('id', '?')}"
    return fmt_value(body)


def fmt_size(n: int) -> str:
    """Bytes for people: 512 B, 12.3 KiB, 4.0 MiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} GiB"


UNKNOWN = "unknown"   # docs/CLI.md: ids that never connected show as `unknown`


def _positive_time(ts: Any) -> bool:
    return isinstance(ts, (int, float)) and not isinstance(ts, bool) and ts > 0


def never_connected(p: Any) -> bool:
    """An offline presence with no `last_seen`: the principal never connected.

    Brokers say "never" with `last_seen` 0 (the contract: times are numbers) or,
    older ones, null; both mean the same here.
    """
    return isinstance(p, dict) and p.get("state") == "offline" and not _positive_time(p.get("last_seen"))


def fmt_seen(ts: Any) -> str:
    """A presence time (`since`, `last_seen`): 0 or null means "never", shown as `-`."""
    return fmt_time(ts) if _positive_time(ts) else "-"


def presence_state(p: Any) -> Any:
    """The state word of a presence object for people: `unknown` when it never connected."""
    if never_connected(p):
        return UNKNOWN
    return p.get("state") if isinstance(p, dict) else p


def presence_text(p: Any) -> str:
    """A presence value (the retained object, or a plain state string) as a word."""
    if isinstance(p, dict):
        state = str(p.get("state", "?"))
        if never_connected(p):
            return UNKNOWN
        if state == "offline" and _positive_time(p.get("last_seen")):
            return f"offline (last seen {fmt_time(p['last_seen'])})"
        if state == "online" and isinstance(p.get("clients"), int) and p["clients"] > 1:
            return f"online ({p['clients']} clients)"
        return state
    if p is None:
        return "-"
    return str(p)


def presence_colour(text: str) -> str | None:
    if text.startswith("online"):
        return "green"
    if text.startswith("offline"):
        return "bright_black"
    return None


@dataclass
class Column:
    key: str
    title: str
    fmt: Callable[[Any], str] = fmt_value
    colour: Callable[[str], str | None] | None = None
    align_right: bool = False


class Output:
    """Everything a command prints goes through one of these."""

    def __init__(self, json_mode: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.color = use_color(self.out)
        self._lock = threading.Lock()   # stream lines come from more than one thread (chat)

    # -- scripts --
    def doc(self, obj: Any) -> None:
        """The one JSON document of a one-shot command."""
        self._write(json.dumps(obj, ensure_ascii=False, indent=2))

    def jsonl(self, obj: Any) -> None:
        """One line of a JSON-lines stream (flushed at once, for pipes)."""
        self._write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))

    # -- people --
    def line(self, text: str = "", **style_kw: Any) -> None:
        self._write(click.style(text, **style_kw) if (style_kw and self.color) else text)

    def s(self, text: str, **style_kw: Any) -> str:
        return click.style(text, **style_kw) if self.color else text

    def table(self, rows: Iterable[dict[str, Any]], columns: list[Column], *, empty: str = "(none)") -> None:
        rows = list(rows)
        if not rows:
            self.line(empty, fg="bright_black")
            return
        cells = [[c.fmt(r.get(c.key)) for c in columns] for r in rows]
        widths = [max(len(c.title), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        head = "  ".join((c.title.upper().rjust if c.align_right else c.title.upper().ljust)(widths[i])
                         for i, c in enumerate(columns)).rstrip()
        self.line(head, bold=True)
        for row in cells:
            parts = []
            for i, c in enumerate(columns):
                text = row[i].rjust(widths[i]) if c.align_right else row[i].ljust(widths[i])
                colour = c.colour(row[i]) if c.colour else None
                if i == len(columns) - 1:
                    text = text.rstrip()
                parts.append(self.s(text, fg=colour) if colour else text)
            self.line("  ".join(parts).rstrip())

    def kv(self, pairs: list[tuple[str, Any]]) -> None:
        width = max((len(k) for k, _ in pairs), default=0)
        for k, v in pairs:
            self.line(f"{self.s(k.ljust(width), bold=True)}  {fmt_value(v)}")

    def warn(self, text: str) -> None:
        prefix = style("roost:", stream=self.err, fg="yellow", bold=True)
        with self._lock:
            click.echo(f"{prefix} {text}", file=self.err)

    def _write(self, text: str) -> None:
        with self._lock:
            click.echo(text, file=self.out, color=self.color)
            self.out.flush()


class Progress:
    """A `label… 3s` ticker on stderr while waiting; silent unless stderr is a terminal."""

    def __init__(self, label: str, err: TextIO | None = None) -> None:
        self.label = label
        self.err = err or sys.stderr
        self.enabled = use_color(self.err) or _isatty(self.err)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join()
            self.err.write("\r\x1b[K")
            self.err.flush()

    def _run(self) -> None:
        start = time.monotonic()
        frames = "|/-\\"
        i = 0
        # Short waits print nothing at all.
        if self._stop.wait(0.4):
            return
        while not self._stop.is_set():
            elapsed = time.monotonic() - start
            self.err.write(f"\r{frames[i % 4]} {self.label} {elapsed:.0f}s\x1b[K")
            self.err.flush()
            i += 1
            self._stop.wait(0.2)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

"""Run one simulated device with known credentials, e.g. on another machine:

    python -m devices --id thermo1 --secret "$SECRET" --kind thermostat --server roost.local:1883

(`roost simulate` registers devices itself but needs the broker's store; this
needs nothing but the network, like real firmware.)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from devices.simulators import SIMULATORS, UNCATALOGUED, DoorSensor, Fleet, make


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devices", description="Run one simulated Roost device.")
    ap.add_argument("--id", required=True, help="device id")
    ap.add_argument("--secret", default=os.environ.get("ROOST_SECRET"), help="device secret (or $ROOST_SECRET)")
    ap.add_argument("--kind", required=True, choices=sorted({**SIMULATORS, **UNCATALOGUED}))
    ap.add_argument("--server", default="127.0.0.1:1883", help="HOST:PORT")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between telemetry readings")
    ap.add_argument("--door-every", type=float, default=60.0, help="mean seconds between door movements")
    ap.add_argument("--state-file", default=None, help="remember the inbox cursor here across restarts")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not args.secret:
        ap.error("--secret (or $ROOST_SECRET) is required")
    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit():
        ap.error(f"--server must be HOST:PORT, got {args.server!r}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sim = make(args.kind, args.id, args.secret, host, int(port), state_file=args.state_file)
    if isinstance(sim, DoorSensor):
        sim.toggle_every = args.door_every
    fleet = Fleet([sim], interval=args.interval)
    signal.signal(signal.SIGINT, lambda *_: fleet.request_stop())
    signal.signal(signal.SIGTERM, lambda *_: fleet.request_stop())
    fleet.start()
    try:
        fleet.run()
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

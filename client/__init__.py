"""People-side client: the `roost` CLI and the SDK it is built on."""

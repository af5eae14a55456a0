"""The web app (issue 14): the second front end over the gateway, served on the
`http` listener next to /metrics (broker/http/). A person signs in with a
principal id and password; the page then speaks the same request envelopes and
receives the same responses and mailbox events as an MQTT client, over one
WebSocket (docs/WEB.md). Nothing of the IM logic lives here."""

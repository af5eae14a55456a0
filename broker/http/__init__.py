"""The http listener (`listeners.<name>.type: http`): /metrics, /healthz,
/readyz and /status.json, served by aiohttp on sockets bound with the MQTT ones."""

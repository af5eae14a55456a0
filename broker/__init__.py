"""The Roost server: hardened amqtt broker, configuration, IM services, storage."""

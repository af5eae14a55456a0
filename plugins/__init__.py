"""amqtt plugins: thin adapters from MQTT events to Roost's services."""

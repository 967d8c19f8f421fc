"""SMS: providers, message texts, and the messages the gateway sends itself."""

"""TLS for mig's migration channels: credentials objects and the session over any channel."""

"""SMTP submission side of the gateway: pre-auth machine, relay filter, protocol."""

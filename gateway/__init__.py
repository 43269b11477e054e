"""IMAP/SMTP gateway: token login for clients, OAuth2 upstream, byte relay."""
__version__ = "0.1.0"

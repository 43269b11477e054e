"""Makes `twistd gateway` available."""

from twisted.application.service import ServiceMaker

gateway = ServiceMaker(
    "IMAP/SMTP gateway",
    "gateway.tap",
    "IMAP/SMTP gateway: token login for clients, OAuth2 upstream, byte relay",
    "gateway",
)

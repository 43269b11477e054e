"""Every metric the gateway exports, in one registry (served by ``GET /metrics``).

One module owns them so that the names, labels and help texts are in one place
(the README's "Monitoring" section lists them), and so that ``/metrics`` shows
the gateway's figures and the process's, not whatever else was imported into
prometheus_client's global registry.

Labels stay bounded: protocol, result, reason code, cap name, pool state, the
local source address (a configured list) and the DNSBL zone (at most 100). Never an account or a client
address: those go to the log.
"""

from __future__ import annotations

from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

prometheus_client.disable_created_metrics()  # no *_created series: half the output, no use here
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)


def Counter(name: str, documentation: str, labels: Any = (), **kwargs: Any) -> prometheus_client.Counter:
    return prometheus_client.Counter(name, documentation, labels, registry=REGISTRY, **kwargs)


def Gauge(name: str, documentation: str, labels: Any = (), **kwargs: Any) -> prometheus_client.Gauge:
    return prometheus_client.Gauge(name, documentation, labels, registry=REGISTRY, **kwargs)


def Histogram(name: str, documentation: str, labels: Any = (), **kwargs: Any) -> prometheus_client.Histogram:
    return prometheus_client.Histogram(name, documentation, labels, registry=REGISTRY, **kwargs)

# Latency buckets in seconds: loopback logins take milliseconds, a provider's
# OAuth2 refresh and login a few hundred, a struggling one seconds.
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Client sessions
SESSIONS_TOTAL = Counter("gateway_sessions_total", "Client connections accepted, by protocol", ["protocol"])
SESSIONS = Gauge("gateway_sessions_active", "Relayed (logged-in) sessions open now", ["protocol"])
CLIENT_CONNECTIONS = Gauge("gateway_client_connections", "Client connections open now (IMAP and SMTP)")
LOGINS = Counter("gateway_logins_total", "Client logins by protocol, result (ok, fail) and reason code",
                 ["protocol", "result", "reason"])
LOGIN_SECONDS = Histogram("gateway_login_seconds",
                          "Client login to upstream session ready, successful logins", ["protocol"],
                          buckets=LATENCY)
RELAYED = Counter("gateway_relayed_bytes_total", "Bytes relayed", ["protocol", "direction"])

# Abuse limits
AUTH_FAILURES = Counter("gateway_auth_failures_total", "Failed client logins", ["protocol"])
AUTH_DELAYED = Counter("gateway_auth_delayed_total", "Failed logins whose answer was delayed", ["protocol"])
LOCKOUTS = Counter("gateway_auth_lockouts_total", "Client addresses locked out after too many failures")
REFUSED = Counter("gateway_connections_refused_total", "Connections refused by a connection cap", ["cap"])

# Upstream
UPSTREAM_CONNECT_SECONDS = Histogram(
    "gateway_upstream_connect_seconds",
    "Upstream connection set up (DNS, TCP, proxy), by protocol and result", ["protocol", "result"],
    buckets=LATENCY)
UPSTREAM_LOGIN_SECONDS = Histogram(
    "gateway_upstream_login_seconds",
    "Upstream greeting, TLS and authentication on a connected socket, by protocol and result",
    ["protocol", "result"], buckets=LATENCY)
UPSTREAM_TLS_HANDSHAKES = Counter(
    "gateway_upstream_tls_handshakes_total",
    "Upstream TLS handshakes of logged-in connections, by whether a session was resumed",
    ["protocol", "resumed"])
POOL = Counter("gateway_upstream_pool_total", "Upstream connections asked for, by outcome",
               ["protocol", "result"])
UPSTREAM_CONNECTIONS = Gauge("gateway_upstream_connections", "Upstream connections open now",
                             ["protocol", "state"])
SOURCE_CONNECTIONS = Gauge("gateway_source_address_connections",
                           "Upstream connections open now, by local source address",
                           ["protocol", "source"])

# OAuth2
OAUTH2_REFRESHES = Counter("gateway_oauth2_refreshes_total", "OAuth2 access token refreshes, by result",
                           ["result"])
OAUTH2_REFRESH_SECONDS = Histogram("gateway_oauth2_refresh_seconds",
                                   "OAuth2 token endpoint round trip", buckets=LATENCY)

# Operations
CERT_RELOADS = Counter("gateway_tls_reloads_total", "Certificate reloads on SIGHUP, by result", ["result"])

# Source-address reputation and warm-up
REPUTATION_LISTED = Gauge("gateway_reputation_listed", "Source addresses listed now, by DNSBL zone", ["zone"])
REPUTATION_CHECKS = Counter("gateway_reputation_checks_total",
                            "DNSBL lookups (one address in one zone), by result", ["result"])
REPUTATION_EXCLUDED = Gauge("gateway_reputation_excluded",
                            "Source addresses listed in some zone and left out of SMTP selection now")
WARMUP_SHARE = Gauge("gateway_warmup_share",
                     "Warm-up share of each pool source address: its weight in the picker, 1 when warm",
                     ["source"])

#!/usr/bin/env bash
# Set up and run every test: installs the Debian packages the integration
# tests start (Dovecot, offlineimap, swaks, Dante, tinyproxy, stunnel, HAProxy, systemd-analyze,
# Chromium and its WebDriver) when
# missing, the Python package with its test extras, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v dovecot >/dev/null 2>&1 || need+=(dovecot-imapd)
[ -x /usr/lib/dovecot/submission ] || need+=(dovecot-submissiond)
command -v offlineimap >/dev/null 2>&1 || need+=(offlineimap)
command -v swaks >/dev/null 2>&1 || need+=(swaks)
# Proxies for the network tests: Dante (SOCKS5), tinyproxy (HTTP CONNECT), stunnel (https:// proxy).
[ -x /usr/sbin/danted ] || need+=(dante-server)
command -v tinyproxy >/dev/null 2>&1 || need+=(tinyproxy)
command -v stunnel4 >/dev/null 2>&1 || need+=(stunnel4)
# HAProxy in front of the gateway's PROXY-protocol listeners.
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
# Redis for the Redis store and the several-instances tests.
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# systemd-analyze verifies contrib/gateway.service (tests/integration/test_contrib.py).
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# A headless browser for the dashboard tests (tests/integration/test_dashboard.py, Selenium).
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    # Keep the Debian package's own Dovecot service from starting: the tests
    # run their own instance from their own config file.
    ours=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d
        ours=1
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
    [ -z "$ours" ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi

python3 -m pip install -q -e '.[test]'
exec python3 -m pytest "$@"

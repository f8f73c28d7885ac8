#!/bin/sh
# Install Debian's Prometheus server for tests/e2e/test_operations.py's scrape test, unless
# one is already there. Needs root and Debian's package registry; prints the binary's
# path. (Tests start their own Prometheus on loopback, with their own config.)
exec sh "$(dirname "$0")/install-debian.sh" "${PROMETHEUS:-} /usr/bin/prometheus" prometheus

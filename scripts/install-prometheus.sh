#!/bin/sh
# Install Debian's Prometheus server for tests/test_operations.py's scrape test, unless
# one is already there. Needs root and Debian's package registry; prints the binary's
# path. (The package's own service is not started: tests start their own on loopback.)
set -eu
for candidate in "${PROMETHEUS:-}" /usr/bin/prometheus; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
        echo "$candidate"
        exit 0
    fi
done
if [ "$(id -u)" != 0 ]; then
    echo "prometheus is missing; run as root (or: sudo apt-get install -y prometheus)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends prometheus >&2
echo /usr/bin/prometheus

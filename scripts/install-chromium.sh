#!/bin/sh
# Install Debian's headless-capable Chromium for the dashboard's browser test, unless one
# is already there. Needs root and Debian's package registry; prints the binary's path.
set -eu
for candidate in "${CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
        echo "$candidate"
        exit 0
    fi
done
if [ "$(id -u)" != 0 ]; then
    echo "chromium is missing; run as root (or: sudo apt-get install -y chromium)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
echo /usr/bin/chromium

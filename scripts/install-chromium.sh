#!/bin/sh
# Install Debian's headless-capable Chromium for the dashboard's browser test, unless one
# is already there. Needs root and Debian's package registry; prints the binary's path.
exec sh "$(dirname "$0")/install-debian.sh" \
    "${CHROMIUM:-} /usr/bin/chromium /usr/bin/chromium-browser" chromium fonts-dejavu-core

#!/bin/sh
# Install Debian packages for a test's outside program, unless it is already there:
#   install-debian.sh "CANDIDATE ..." PACKAGE ...
# prints the first candidate path that is executable, else installs PACKAGE ... (needs root
# and Debian's package registry) and prints the first candidate again.
set -eu
candidates=$1
shift
found() {
    for candidate in $candidates; do
        if [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}
found && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "$1 is missing; run as root (or: sudo apt-get install -y $*)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "$@" >&2
found

#!/usr/bin/env bash
# The browser tests (tests/test_serve_browser.py) drive Debian's Chromium through its
# chromedriver: no browser is downloaded. `make test` runs this script first.
#
#   scripts/ensure_browser.sh           install them when missing: through apt-get as root
#                                       (non-interactive, quiet); otherwise print the one line
#                                       with the command to run, and go on (exit 0)
#   scripts/ensure_browser.sh --check   exit 1 with that same line when missing (what the
#                                       browser tests report instead of a driver error)
set -euo pipefail

PACKAGES=(chromium chromium-driver)
HINT="Chromium for the browser tests is missing: run 'sudo apt-get update && sudo apt-get install -y ${PACKAGES[*]}' (or make test as root)"

installed() {
    command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1
}

if installed; then
    exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
    echo "$HINT"
    exit 1
fi
if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${PACKAGES[*]} for the browser tests (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${PACKAGES[@]}"
    exit 0
fi
echo "$HINT"

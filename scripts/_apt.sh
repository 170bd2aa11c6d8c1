# shellcheck shell=bash
# Sourced by scripts/test and scripts/check-deploy: installs Debian packages
# that are missing (as root, or through sudo), refreshing the index only when
# an install fails without it. Without apt-get, says in one line what is
# missing and how to get it, and fails.
apt_install() {
    if ! command -v apt-get >/dev/null; then
        echo "dlqd: the suite needs $* (Debian's packages; no apt-get here): install them with your package manager and rerun" >&2
        exit 1
    fi
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 ||
        { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}

# shellcheck shell=bash
# Sourced by scripts/test and scripts/check-deploy: installs Debian packages
# that are missing (as root, or through sudo), refreshing the index only when
# an install fails without it.
apt_install() {
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 ||
        { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}

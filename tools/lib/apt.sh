# Sourced by tools/*/install.sh: install one Debian package the way every tool here needs.
#
#   source "$(dirname "$0")/../lib/apt.sh"
#   apt_ready tools/x/install.sh "what" || exit 0   # sets APT_SUDO; explains when impossible
#   apt_install tools/x/install.sh PACKAGE || exit 0
#
# Both print their reason on stderr and return 1 when installing is impossible (no
# apt-get, not root and no passwordless sudo, the install failed): the callers exit 0
# then, because `make test` must go on and the tests that need the tool skip with that
# reason. A fresh machine has no package lists yet, so a failed install updates them once
# and retries. Another apt-get or dpkg running at the same time (a second install script,
# the machine's own updates) holds the dpkg lock: wait for it up to 5 minutes instead of
# failing at once.

APT_SUDO=()

apt_ready() {
    local script=$1 what=$2
    if ! command -v apt-get >/dev/null; then
        echo "$script: no apt-get on this machine: install $what by hand" >&2
        return 1
    fi
    APT_SUDO=()
    if [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            APT_SUDO=(sudo -n)
        else
            echo "$script: not root and no passwordless sudo: cannot apt-get install" >&2
            return 1
        fi
    fi
}

apt_install() {
    local script=$1 package=$2
    local apt=("${APT_SUDO[@]}" apt-get -o DPkg::Lock::Timeout=300)
    export DEBIAN_FRONTEND=noninteractive
    if ! "${apt[@]}" install -y -q --no-install-recommends "$package" >/dev/null; then
        "${apt[@]}" update -q >/dev/null || true
        if ! "${apt[@]}" install -y -q --no-install-recommends "$package" >/dev/null; then
            echo "$script: apt-get install $package failed" >&2
            return 1
        fi
    fi
}

# shellcheck shell=bash
# What the README's commands (scripts/test, scripts/demo) need from Debian, in one place;
# sourced by them and by .ci/run.

# The root integration suite and the demo: network namespaces and veths (iproute2), nft and
# iptables as independent witnesses of the kernel's rules (the agent itself needs neither),
# the CNI ptp plugin (/usr/lib/cni/ptp), ping, sysctl (procps); for the app log test, Go
# (Cloud Foundry's Loggregator agents, built from ../shared/tools/loggregator-agent) and openssl
# (its test certificates).
# shellcheck disable=SC2034  # read by the scripts that source this file
test_packages=(nftables iproute2 iptables containernetworking-plugins iputils-ping procps golang-go openssl)

die() { echo "$(basename "$0"): $*" >&2; exit 1; }
note() { echo "$(basename "$0"): $*" >&2; }

# How to run this script as root and keep a rustup toolchain of the user's (sudo resets PATH
# and HOME), for the messages below.
as_root_hint() {
  echo "sudo -E env \"PATH=\$PATH\" \"HOME=\$HOME\" $0"
}

# require_root: the suite and the demo make network namespaces and nftables rules.
require_root() {
  (( EUID == 0 )) \
    || die "needs root (network namespaces, nftables rules, apt-get); with your own Rust toolchain: $(as_root_hint)"
}

# require_cargo: a clear message instead of "command not found".
require_cargo() {
  command -v cargo >/dev/null 2>&1 \
    || die "cargo is not on the PATH; with a rustup toolchain of another user: $(as_root_hint)"
}

# missing_packages PKG...: prints those of PKG not installed, one a line.
missing_packages() {
  local pkg status
  for pkg in "$@"; do
    status="$(dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null || true)"
    [[ "${status}" == *" ok installed" ]] || echo "${pkg}"
  done
}

# install_packages PKG...: installs with apt-get those of PKG that are missing; runs
# `apt-get update` once, and only when something is missing.
install_packages() {
  local missing=()
  if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    note "no apt-get/dpkg here: install the equivalents of: $* (continuing without)"
    return 0
  fi
  mapfile -t missing < <(missing_packages "$@")
  (( ${#missing[@]} )) || return 0
  note "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

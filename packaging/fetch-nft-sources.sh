#!/usr/bin/env bash
# Fetches the source tarballs that bosh-release/packages/nftables builds nft from (libmnl,
# jansson, libnftnl, nftables) out of the Debian source archive this host's apt already uses,
# and adds them as release blobs nftables/<name>-<version>.tar.<ext>.
#
#   packaging/fetch-nft-sources.sh               # fetch and add as blobs
#   packaging/fetch-nft-sources.sh --output DIR  # only put the renamed tarballs in DIR
#   packaging/fetch-nft-sources.sh --from DIR    # take tarballs already in DIR (e.g. upstream
#                                                # release downloads) instead of fetching
#
# Fetching uses a private apt configuration (deb-src twins of the host's enabled Debian
# entries, found with `apt-cache policy`) under a temporary directory: the host's apt sources
# and lists are left alone. `apt-get source --download-only` checks every file against the
# signed Sources index. Packages are taken from the host's suite (Debian 12: libmnl 1.0.4,
# jansson 2.14, libnftnl 1.2.4, nftables 1.0.6); pin others with NFT_SOURCE_PACKAGES, e.g.
# NFT_SOURCE_PACKAGES="libmnl=1.0.5-3 jansson libnftnl=1.2.9-1 nftables=1.1.3-1".
# Tarballs whose name is already in bosh-release/config/blobs.yml must match its sha256.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

output=""
from=""
while (( $# )); do
  case "$1" in
    --output) output="${2:?--output needs a directory}"; shift 2 ;;
    --from) from="${2:?--from needs a directory}"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done

names=(libmnl jansson libnftnl nftables)
read -r -a packages <<< "${NFT_SOURCE_PACKAGES:-${names[*]}}"

tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
chmod 0755 "${tmp}"
downloads="${tmp}/downloads"
mkdir -p "${downloads}"
# Let apt download as its sandbox user instead of warning and falling back to root.
chown _apt "${downloads}" 2>/dev/null || true

if [[ -z "${from}" ]]; then
  apt_dir="${tmp}/apt"
  mkdir -p "${apt_dir}/lists/partial" "${apt_dir}/cache/archives/partial" "${apt_dir}/sources.list.d"
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  # ` 500 <uri> <suite>/<component> <arch> Packages` followed by `release …,o=Debian,…`.
  apt-cache policy | awk -v keyring="${keyring}" '
    $NF == "Packages" && $2 ~ /^[a-z+]+:\/\// && split($3, sc, "/") == 2 { uri = $2; suite = sc[1]; comp = sc[2]; next }
    uri != "" && /release / && /o=Debian,/ {
      opts = (system("test -r " keyring) == 0) ? "[signed-by=" keyring "] " : ""
      line = "deb-src " opts uri " " suite " " comp
      if (!(line in seen)) { seen[line] = 1; print line }
    }
    { uri = "" }
  ' > "${apt_dir}/sources.list.d/debian-src.list"
  [[ -s "${apt_dir}/sources.list.d/debian-src.list" ]] \
    || die "no enabled Debian package source found in this host's apt configuration"
  apt_opts=(
    -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::Etc::SourceParts=${apt_dir}/sources.list.d"
    -o "Dir::State::Lists=${apt_dir}/lists"
    -o "Dir::Cache=${apt_dir}/cache"
    -o "APT::Get::Only-Source=true"
  )
  note "updating a private source index from $(wc -l < "${apt_dir}/sources.list.d/debian-src.list") Debian source entries"
  apt-get "${apt_opts[@]}" -qq update
  failed=()
  for pkg in "${packages[@]}"; do
    if ! (cd "${downloads}" && apt-get "${apt_opts[@]}" -q source --download-only "${pkg}" >"${tmp}/${pkg%%=*}.log" 2>&1); then
      failed+=("${pkg}")
      grep -E '^(E|W):' "${tmp}/${pkg%%=*}.log" | sed 's/^/  /' >&2 || true
    fi
  done
  (( ${#failed[@]} == 0 )) || note "could not download the source of: ${failed[*]}"
  src_dir="${downloads}"
else
  [[ -d "${from}" ]] || die "${from} is not a directory"
  src_dir="${from}"
fi

blobs_yml="${release_dir}/config/blobs.yml"
missing=()
for name in "${names[@]}"; do
  # Debian's <name>_<version>.orig.tar.<ext> or upstream's <name>-<version>.tar.<ext>.
  shopt -s nullglob
  candidates=("${src_dir}/${name}"_*.orig.tar.{gz,bz2,xz} "${src_dir}/${name}"-[0-9]*.tar.{gz,bz2,xz})
  shopt -u nullglob
  if (( ${#candidates[@]} != 1 )); then
    missing+=("${name}")
    continue
  fi
  file="${candidates[0]}"
  base="$(basename "${file}")"
  blob="nftables/$(sed -E 's/^([a-z]+)_(.*)\.orig\.(tar\..*)$/\1-\2.\3/' <<< "${base}")"
  sha="sha256:$(sha256sum "${file}" | cut -d' ' -f1)"
  if [[ -f "${blobs_yml}" ]]; then
    expected="$(ruby -ryaml -e 'e = (YAML.load_file(ARGV[0]) || {})[ARGV[1]]; puts e["sha"] if e' "${blobs_yml}" "${blob}")"
    if [[ -n "${expected}" && "${expected}" != "${sha}" ]]; then
      die "${base}: ${sha} does not match ${expected} recorded for ${blob} in config/blobs.yml"
    fi
  fi
  if [[ -n "${output}" ]]; then
    mkdir -p "${output}"
    cp "${file}" "${output}/$(basename "${blob}")"
    note "${output}/$(basename "${blob}")"
  else
    add_blob "${blob}" "${file}"
  fi
done

if (( ${#missing[@]} )); then
  die "no source tarball for: ${missing[*]} (put <name>-<version>.tar.* files in a directory and use --from DIR)"
fi

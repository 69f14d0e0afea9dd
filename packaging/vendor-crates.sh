#!/usr/bin/env bash
# Vendors the agent's crates (`cargo vendor`, per Cargo.lock) into the blob that
# bosh-release/packages/egress-guard compiles from offline: a tarball holding vendor/ and the
# .cargo/config.toml that points cargo at it. Never commit the vendored crates.
#
#   packaging/vendor-crates.sh              # build it and add it as blob egress-guard/cargo-vendor.tar.gz
#   packaging/vendor-crates.sh --output F   # only write the tarball to F
#   --offline                               # vendor from the local cargo cache, no registry access
#
# Run it again whenever Cargo.lock changes (the blob's sha then changes too).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

output=""
offline=()
while (( $# )); do
  case "$1" in
    --output) output="${2:?--output needs a file}"; shift 2 ;;
    --offline) offline=(--offline); shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done

work="${repo_root}/packaging/vendor"   # git-ignored
rm -rf "${work}"
mkdir -p "${work}/.cargo"
(
  cd "${work}"
  # Relative path on purpose: the printed config then says directory = "vendor", which cargo
  # resolves against the directory holding .cargo/ wherever the tarball is unpacked.
  cargo vendor "${offline[@]}" --locked --manifest-path "${repo_root}/Cargo.toml" vendor \
    > .cargo/config.toml
)
grep -q 'replace-with = "vendored-sources"' "${work}/.cargo/config.toml" \
  || die "unexpected cargo vendor output in ${work}/.cargo/config.toml"

tarball="${work}/cargo-vendor.tar.gz"
(cd "${work}" && reproducible_tgz "${tarball}" .cargo vendor)
note "vendored $(find "${work}/vendor" -mindepth 1 -maxdepth 1 -type d | wc -l) crates: $(du -h "${tarball}" | cut -f1) $(sha256sum "${tarball}" | cut -d' ' -f1)"

if [[ -n "${output}" ]]; then
  mkdir -p "$(dirname "${output}")"
  cp "${tarball}" "${output}"
else
  add_blob egress-guard/cargo-vendor.tar.gz "${tarball}"
fi

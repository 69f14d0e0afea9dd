#!/usr/bin/env bash
# Copies the agent's crate to where bosh-release/packages/egress-guard/spec expects it:
# bosh-release/src/egress-guard/source/ (git-ignored), or to the directory given as the only
# argument. Run it before every `bosh create-release`.
#
# Copied: Cargo.toml, Cargo.lock, and whichever of build.rs, src/, benches/, tests/, examples/
# exist, because cargo reads every target the manifest declares or discovers even when
# building only the binary.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

dest="${1:-${release_dir}/src/egress-guard/source}"
for f in Cargo.toml Cargo.lock src/main.rs; do
  [[ -f "${repo_root}/${f}" ]] || die "missing ${repo_root}/${f}"
done
rm -rf "${dest}"
mkdir -p "${dest}"
cp "${repo_root}/Cargo.toml" "${repo_root}/Cargo.lock" "${dest}/"
for path in build.rs src benches tests examples testkit; do
  if [[ -e "${repo_root}/${path}" ]]; then
    cp -R "${repo_root}/${path}" "${dest}/${path}"
  fi
done
note "staged the agent source in ${dest}"

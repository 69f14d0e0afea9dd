#!/usr/bin/env bash
# Copies the agent's source (Cargo.toml, Cargo.lock, src/) to where
# bosh-release/packages/egress-guard/spec expects it: bosh-release/src/egress-guard/ (git-ignored),
# or to the directory given as the only argument. Run it before every `bosh create-release`.
# If the crate gains files its build needs (build.rs, …), add them here and to the package spec.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

dest="${1:-${release_dir}/src/egress-guard}"
for f in Cargo.toml Cargo.lock src/main.rs; do
  [[ -f "${repo_root}/${f}" ]] || die "missing ${repo_root}/${f}"
done
rm -rf "${dest}"
mkdir -p "${dest}"
cp "${repo_root}/Cargo.toml" "${repo_root}/Cargo.lock" "${dest}/"
cp -R "${repo_root}/src" "${dest}/src"
note "staged the agent source in ${dest}"

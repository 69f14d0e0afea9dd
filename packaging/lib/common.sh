# Shared helpers for packaging/*.sh (sourced, not executed).

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
release_dir="${repo_root}/bosh-release"

die() { echo "$(basename "$0"): $*" >&2; exit 1; }
note() { echo "$(basename "$0"): $*" >&2; }

# Deterministic gzip'd tar of the given paths (relative to the current directory): same
# content, same bytes, so the blob's sha only changes when its content does.
reproducible_tgz() {
  local out="$1"; shift
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='@0' \
      --format=gnu \
      -cf - "$@" | gzip -n -9 > "${out}"
}

# add_blob NAME FILE: make FILE the release blob NAME (e.g. egress-guard/cargo-vendor.tar.gz), the
# way `bosh add-blob --sha2` does. Uses the bosh CLI when installed; otherwise copies the file
# into bosh-release/blobs/ and records size and sha256 in config/blobs.yml (an entry whose
# content changed loses its object_id, so `bosh upload-blobs` uploads it again).
add_blob() {
  local name="$1" file="$2"
  if command -v bosh >/dev/null 2>&1; then
    (cd "${release_dir}" && bosh add-blob --sha2 "${file}" "${name}")
    return
  fi
  command -v ruby >/dev/null 2>&1 || die "adding a blob without the bosh CLI needs ruby"
  mkdir -p "$(dirname "${release_dir}/blobs/${name}")"
  if [[ "$(readlink -f "${file}")" != "$(readlink -f "${release_dir}/blobs/${name}")" ]]; then
    cp "${file}" "${release_dir}/blobs/${name}"
  fi
  ruby -ryaml -rdigest -e '
    path, name, file = ARGV
    blobs = (File.exist?(path) && YAML.load_file(path)) || {}
    entry = { "size" => File.size(file), "sha" => "sha256:" + Digest::SHA256.file(file).hexdigest }
    old = blobs[name] || {}
    entry["object_id"] = old["object_id"] if old["object_id"] && old["sha"] == entry["sha"]
    blobs[name] = entry
    File.write(path, YAML.dump(blobs.sort.to_h))
  ' "${release_dir}/config/blobs.yml" "${name}" "${file}"
  note "blob ${name}: $(wc -c < "${file}") bytes, recorded in bosh-release/config/blobs.yml"
}

require_relative 'test_helper'
require_relative 'lib/packaging_helper'
require_relative 'lib/bpm_agent'
require 'fileutils'
require 'socket'
require 'timeout'

class EgressGuardPackageTest < Minitest::Test
  include PackagingHelper

  # One compile (2-3 minutes) shared by the tests of this class.
  @build = nil
  class << self
    attr_accessor :build
  end
  Minitest.after_run { FileUtils.rm_rf(EgressGuardPackageTest.build[:tmp]) if EgressGuardPackageTest.build }

  def build
    self.class.build ||= compile_package
  end

  def compile_package
    skip 'needs cargo and rustc' unless have?('cargo') && have?('rustc')
    tmp = Dir.mktmpdir('egress-guard-release')
    tarball = build_release_tarball(tmp)
    compiled = compile_release(tarball, tmp)
    { tmp: tmp, tarball: tarball, install_dir: compiled.fetch('egress-guard'),
      bin: File.join(compiled.fetch('egress-guard'), 'bin', 'egress-guard'),
      job_dir: File.join(tmp, 'release', 'jobs', 'egress-guard') }
  end

  SHARED_BOSH = File.expand_path('../shared/tools/bosh', TestHelper::REPO_ROOT)

  def bosh(*args, dir:)
    bin = ENV.fetch('BOSH_CLI', File.join(TestHelper::REPO_ROOT, 'target', 'bosh', 'bin', 'bosh'))
    assert File.executable?(bin), "no bosh CLI at #{bin} (tests/run builds it; or set BOSH_CLI)"
    # The CLI's cache (downloaded and built blobs) stays in the scratch directory.
    run!({ 'HOME' => File.dirname(dir) }, bin, *args, '--dir', dir, '-n')
  end

  # A stand-in for the Rust toolchain tarball of rust-1-linux (377 MB, not here): the same name
  # and layout (rust-<version>-x86_64-unknown-linux-gnu/install.sh taking --prefix,
  # --without=rust-docs, --disable-ldconfig) whose installer links this machine's toolchain
  # (`rustc --print sysroot`) into the prefix instead of copying one.
  def stand_in_toolchain(dir)
    version = run!('rustc', '--version')[/\Arustc (\d+\.\d+\.\d+)/, 1] or flunk 'rustc --version'
    sysroot = run!('rustc', '--print', 'sysroot').strip
    name = "rust-#{version}-x86_64-unknown-linux-gnu"
    FileUtils.mkdir_p(File.join(dir, name))
    File.write(File.join(dir, name, 'install.sh'), <<~SH)
      #!/bin/sh
      # Stand-in for the Rust installer (egress-guard's release tests): links the toolchain at
      # #{sysroot} into --prefix.
      set -eu
      prefix=""
      for arg in "$@"; do
        case "$arg" in --prefix=*) prefix="${arg#--prefix=}" ;; esac
      done
      [ -n "$prefix" ] || { echo "install.sh: --prefix=DIR is required" >&2; exit 1; }
      mkdir -p "$prefix/bin" "$prefix/lib"
      for tool in cargo rustc rustdoc; do ln -sf "#{sysroot}/bin/$tool" "$prefix/bin/$tool"; done
      ln -sf "#{sysroot}/lib/rustlib" "$prefix/lib/rustlib"
    SH
    File.chmod(0o755, File.join(dir, name, 'install.sh'))
    tarball = File.join(dir, "#{name}.tar.gz")
    run!('tar', '-czf', tarball, '-C', dir, name)
    [tarball, version]
  end

  # What an operator does, with the real bosh CLI, on scratch copies (local blobstores on both
  # sides): a final release of bosh-package-rust-release holding the stand-in toolchain;
  # `bosh vendor-package rust-1-linux` from it into egress-guard's release; the crates blob
  # and the staged source; `bosh create-release --force --tarball`. Returns the tarball.
  def build_release_tarball(tmp)
    rust = File.join(tmp, 'bosh-package-rust-release')
    FileUtils.cp_r(File.join(SHARED_BOSH, 'bosh-package-rust-release'), rust)
    run!('chmod', '-R', 'u+w', rust)
    File.write(File.join(rust, 'config', 'final.yml'), YAML.dump(
      'name' => 'rust',
      'blobstore' => { 'provider' => 'local', 'options' => { 'blobstore_path' => File.join(tmp, 'rust-blobstore') } }
    ))
    File.write(File.join(rust, 'config', 'blobs.yml'), "--- {}\n")
    toolchain, version = stand_in_toolchain(File.join(tmp, 'stand-in'))
    bosh('add-blob', toolchain, File.basename(toolchain), dir: rust)
    bosh('create-release', '--final', '--force', '--version', "#{version}-stand-in", dir: rust)

    release = File.join(tmp, 'release')
    FileUtils.mkdir_p(release)
    %w[config jobs packages].each { |d| FileUtils.cp_r(File.join(RELEASE_DIR, d), release) }
    File.write(File.join(release, 'config', 'final.yml'), YAML.dump(
      'name' => 'egress-guard',
      'blobstore' => { 'provider' => 'local', 'options' => { 'blobstore_path' => File.join(tmp, 'egress-guard-blobstore') } }
    ))
    bosh('vendor-package', 'rust-1-linux', rust, dir: release)
    assert File.file?(File.join(release, 'packages', 'rust-1-linux', 'spec.lock')), 'vendor-package wrote spec.lock'

    crates = File.join(tmp, 'cargo-vendor.tar.gz')
    vendor_out, vendor_status = Open3.capture2e(File.join(PACKAGING_DIR, 'vendor-crates.sh'), '--output', crates)
    assert vendor_status.success?, "vendor-crates.sh failed:\n#{vendor_out}"
    bosh('add-blob', crates, 'egress-guard/cargo-vendor.tar.gz', dir: release)
    run!(File.join(PACKAGING_DIR, 'stage-source.sh'), File.join(release, 'src', 'egress-guard', 'source'))
    tarball = File.join(tmp, 'egress-guard-dev.tgz')
    bosh('create-release', '--force', '--tarball', tarball, dir: release)
    tarball
  end

  # The release tarball's packages compiled as a BOSH compilation VM does: in dependency order,
  # each package's archive unpacked into BOSH_COMPILE_TARGET and its `packaging` run there
  # (offline) with BOSH_INSTALL_TARGET and the compiled dependencies under BOSH_PACKAGES_DIR.
  # Returns package name => install directory; unpacks the jobs into tmp/release/jobs.
  def compile_release(tarball, tmp)
    unpacked = File.join(tmp, 'tarball')
    FileUtils.mkdir_p(unpacked)
    run!('tar', '-xzf', tarball, '-C', unpacked)
    manifest = YAML.safe_load(File.read(File.join(unpacked, 'release.MF')))
    packages_dir = File.join(tmp, 'packages')
    compiled = {}
    pending = manifest.fetch('packages')
    until pending.empty?
      ready = pending.select { |pkg| (pkg['dependencies'] || []).all? { |d| compiled.key?(d) } }
      flunk "packages with unmet dependencies: #{pending.map { |pkg| pkg['name'] }}" if ready.empty?
      ready.each do |pkg|
        name = pkg.fetch('name')
        compile_dir = File.join(tmp, 'compile', name)
        install_dir = File.join(packages_dir, name)
        FileUtils.mkdir_p([compile_dir, install_dir])
        run!('tar', '-xzf', File.join(unpacked, 'packages', "#{name}.tgz"), '-C', compile_dir)
        out, status, elapsed, offline = compile(compile_dir, install_dir, 'BOSH_PACKAGES_DIR' => packages_dir)
        assert status.success?, "package #{name}: packaging failed:\n#{out}"
        warn format('  package %s compiled in %.0fs (%s)', name, elapsed, offline ? 'no network' : 'network available')
        compiled[name] = install_dir
      end
      pending -= ready
    end
    manifest.fetch('jobs').each do |job|
      dir = File.join(tmp, 'release', 'jobs', job.fetch('name'))
      FileUtils.rm_rf(dir)
      FileUtils.mkdir_p(dir)
      run!('tar', '-xzf', File.join(unpacked, 'jobs', "#{job['name']}.tgz"), '-C', dir)
    end
    compiled
  end

  # The job's config as BOSH renders it from the release tarball's job (job.MF is the spec).
  def render_from_tarball_job(job_dir, template, properties)
    spec = YAML.safe_load(File.read(File.join(job_dir, 'job.MF')))
    Bosh::Common::Template::Test::Template.new(spec, File.join(job_dir, 'templates', template))
                                          .render(properties, spec: Bosh::Common::Template::Test::InstanceSpec.new)
  end

  def test_the_release_tarball_holds_the_vendored_toolchain_and_the_agent
    b = build
    manifest = YAML.safe_load(File.read(File.join(b[:tmp], 'tarball', 'release.MF')))
    names = manifest['packages'].map { |pkg| [pkg['name'], pkg['dependencies'] || []] }.to_h
    assert_equal({ 'egress-guard' => ['rust-1-linux'], 'rust-1-linux' => [] }, names)
    assert_equal %w[egress-guard], manifest['jobs'].map { |job| job['name'] }
    toml = render_from_tarball_job(b[:job_dir], 'egress-guard.toml.erb', props('dns' => { 'enabled' => true }))
    assert_check_config_passes_with(b[:bin], toml)
  end

  def assert_check_config_passes_with(bin, toml)
    Dir.mktmpdir('egress-guard-config') do |dir|
      path = File.join(dir, 'egress-guard.toml')
      File.write(path, toml)
      out, status = Open3.capture2e(bin, 'check-config', '--config', path)
      assert status.success?, "the compiled agent rejected the config BOSH renders:\n#{out}\n#{toml}"
      out
    end
  end

  def test_compiles_offline_from_vendored_crates_with_the_rust_package
    b = build
    assert File.executable?(b[:bin])
    version = File.read(File.join(TestHelper::REPO_ROOT, 'Cargo.toml'))[/^version\s*=\s*"([^"]+)"/, 1]
    assert_equal "egress-guard #{version}", run!(b[:bin], '--version').strip
    assert_equal [File.join(b[:install_dir], 'bin')], Dir.glob(File.join(b[:install_dir], '*')), 'only bin/ is installed'
  end

  # `cargo deb` with the package's release binary (cargo-deb is optional: skipped without it).
  def test_cargo_deb_ships_binary_conffile_and_unit_not_enabled
    skip 'cargo-deb is not installed (cargo install cargo-deb)' unless system('cargo deb --version', %i[out err] => File::NULL)
    b = build
    target = File.join(b[:tmp], 'deb-target')
    FileUtils.mkdir_p(File.join(target, 'release'))
    FileUtils.cp(b[:bin], File.join(target, 'release', 'egress-guard'))
    deb = File.join(b[:tmp], 'egress-guard.deb')
    run!({ 'CARGO_TARGET_DIR' => target }, 'cargo', 'deb', '--no-build', '--output', deb, chdir: TestHelper::REPO_ROOT)

    contents = run!('dpkg-deb', '--contents', deb)
    assert_match %r{ \./usr/bin/egress-guard$}, contents
    assert_match %r{ \./etc/egress-guard/egress-guard\.toml$}, contents
    assert_match %r{ \./(usr/)?lib/systemd/system/egress-guard\.service$}, contents
    Dir.mktmpdir do |dir|
      run!('dpkg-deb', '--control', deb, dir)
      assert_equal "/etc/egress-guard/egress-guard.toml\n", File.read(File.join(dir, 'conffiles'))
      control = File.read(File.join(dir, 'control'))
      # The agent speaks nf_tables netlink itself: no nft at run time.
      refute_match(/\bnftables\b/, control[/^Depends:.*$/].to_s)
      postinst = File.read(File.join(dir, 'postinst'))
      refute_match(/systemctl (start|enable)|deb-systemd-invoke (start|restart) /, postinst, 'installing must not start the service')
      # Enabling only re-creates the links of a service the admin had enabled before.
      postinst.scan(/^.*deb-systemd-helper enable.*$/) do
        assert_operator postinst.index('was-enabled'), :<, postinst.index('deb-systemd-helper enable'), postinst
      end
      assert_includes File.read(File.join(dir, 'prerm')), 'deb-systemd-invoke stop egress-guard.service', 'removal stops the service' 
    end
    Dir.mktmpdir do |dir|
      run!('dpkg-deb', '--extract', deb, dir)
      unit = Dir.glob(File.join(dir, '{usr/,}lib/systemd/system/egress-guard.service')).first
      assert_equal File.read(File.join(PACKAGING_DIR, 'egress-guard.service')), File.read(unit)
      assert_equal File.read(File.join(TestHelper::REPO_ROOT, 'config', 'egress-guard.toml')),
                   File.read(File.join(dir, 'etc', 'egress-guard', 'egress-guard.toml'))
      assert_equal "egress-guard #{run!(b[:bin], '--version').strip.split.last}", run!(File.join(dir, 'usr', 'bin', 'egress-guard'), '--version').strip
    end
  end
end

class SystemdUnitTest < Minitest::Test
  include PackagingHelper

  UNIT = File.join(PackagingHelper::PACKAGING_DIR, 'egress-guard.service')

  def test_unit_passes_systemd_analyze_verify
    skip 'needs systemd-analyze' unless have?('systemd-analyze') && File.directory?('/lib/systemd/system')
    skip 'needs /bin/kill (procps), the unit\'s ExecReload' unless File.executable?('/bin/kill')
    Dir.mktmpdir('egress-guard-unit') do |root|
      FileUtils.mkdir_p(File.join(root, 'usr', 'bin'))
      FileUtils.cp(egress_guard_bin, File.join(root, 'usr', 'bin', 'egress-guard'))
      # ExecReload's kill, from procps (priority important: on every Debian system).
      FileUtils.mkdir_p(File.join(root, 'bin'))
      FileUtils.cp('/bin/kill', File.join(root, 'bin', 'kill'))
      FileUtils.mkdir_p(File.join(root, 'lib', 'systemd'))
      FileUtils.cp_r('/lib/systemd/system', File.join(root, 'lib', 'systemd', 'system'))
      FileUtils.mkdir_p(File.join(root, 'etc', 'systemd', 'system'))
      FileUtils.cp(UNIT, File.join(root, 'etc', 'systemd', 'system', 'egress-guard.service'))
      out, status = Open3.capture2e('systemd-analyze', 'verify', "--root=#{root}", '/etc/systemd/system/egress-guard.service')
      assert status.success?, out
      refute_match(/egress-guard\.service:/, out, out)
    end
  end

  def test_unit_runs_the_agent_with_the_packaged_config
    unit = File.read(UNIT)
    assert_includes unit, 'ExecStart=/usr/bin/egress-guard run --config /etc/egress-guard/egress-guard.toml'
    assert_includes unit, 'ExecStartPre=/usr/bin/egress-guard check-config --config /etc/egress-guard/egress-guard.toml'
    assert_includes unit, 'ExecReload=/bin/kill -HUP $MAINPID'
    assert_match(/^NoNewPrivileges=yes$/, unit)
    assert_match(/^WantedBy=multi-user.target$/, unit)
    assets = File.read(File.join(TestHelper::REPO_ROOT, 'Cargo.toml'))[/^\[package\.metadata\.deb\].*/m]
    refute_nil assets, 'Cargo.toml has no [package.metadata.deb]'
    assert_includes assets, '["config/egress-guard.toml", "etc/egress-guard/egress-guard.toml", "644"]'
    assert_includes assets, '["target/release/egress-guard", "usr/bin/", "755"]'
    assert_includes assets, 'conf-files = ["/etc/egress-guard/egress-guard.toml"]'
    assert_match(/unit-scripts = "packaging".*enable = false, start = false/, assets)
    %w[preinst postinst prerm postrm].each do |script|
      refute File.exist?(File.join(PACKAGING_DIR, script)), "cargo-deb would take packaging/#{script} as a maintainer script"
    end
  end
end

# Runs the agent the way bpm does (uid other than root, only the capabilities bpm.yml lists,
# no_new_privs) in a scratch network namespace, with the job's rendered config and post-start.
class AgentPrivilegesTest < Minitest::Test
  include BpmAgent

  def test_ready_with_net_admin_only_and_rules_stay_after_stop
    with_netns do |ns|
      config = write_config({})
      with_agent(ns, config, BPM_LIKE) do |log|
        out, status = Open3.capture2e('ip', 'netns', 'exec', ns, post_start(30))
        assert status.success?, "post-start failed:\n#{out}\n--- agent log ---\n#{File.read(log)}"
        assert_includes tables(ns), 'table inet egress_guard'
        assert_match(/"restricted":\s*2/, run!('ip', 'netns', 'exec', ns, 'curl', '-s', "http://#{LISTEN}/readyz"), 'store not read')
      end
      assert_includes tables(ns), 'table inet egress_guard', 'stopping the agent must leave its rules (fail closed)'
    end
  end

  def test_disabled_removes_the_table_and_is_ready
    with_netns do |ns|
      run!('ip', 'netns', 'exec', ns, 'nft', 'add', 'table', 'inet', 'egress_guard')
      with_agent(ns, write_config('enabled' => false), BPM_LIKE) do |log|
        out, status = Open3.capture2e('ip', 'netns', 'exec', ns, post_start(30))
        assert status.success?, "post-start failed:\n#{out}\n--- agent log ---\n#{File.read(log)}"
        refute_includes tables(ns), 'egress_guard'
      end
    end
  end

  # packaging/egress-guard.service: root, but only the capabilities its bounding set lists.
  def test_systemd_unit_capabilities_suffice
    unit = File.read(File.join(PACKAGING_DIR, 'egress-guard.service'))
    caps = unit[/^CapabilityBoundingSet=(.*)$/, 1].split.map { |c| c.delete_prefix('CAP_').downcase }
    assert_equal %w[net_admin dac_read_search], caps
    systemd_like = ['setpriv', '--inh-caps=-all', "--bounding-set=-all,#{caps.map { |c| "+#{c}" }.join(',')}", '--no-new-privs']
    with_netns do |ns|
      # The store stays owned by another user, mode 0600, as silk leaves it.
      with_agent(ns, write_config({}), systemd_like) do |log|
        out, status = Open3.capture2e('ip', 'netns', 'exec', ns, post_start(30))
        assert status.success?, "post-start failed:\n#{out}\n--- agent log ---\n#{File.read(log)}"
        # Both store entries were read (no veth here, so even the staging one stays restricted).
        assert_match(/"restricted":\s*2/, run!('ip', 'netns', 'exec', ns, 'curl', '-s', "http://#{LISTEN}/readyz"))
      end
    end
  end

  def test_without_net_admin_it_never_becomes_ready
    with_netns do |ns|
      with_agent(ns, write_config({}), NO_CAPS) do
        out, status = Open3.capture2e('ip', 'netns', 'exec', ns, post_start(3))
        refute status.success?, "post-start passed without NET_ADMIN:\n#{out}"
        refute_includes tables(ns), 'egress_guard'
      end
    end
  end
end

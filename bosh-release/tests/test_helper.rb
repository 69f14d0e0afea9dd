require 'minitest/autorun'
require 'json'
require 'open3'
require 'tmpdir'
require 'yaml'
require_relative 'lib/bosh_template'

module TestHelper
  RELEASE_DIR = File.expand_path('..', __dir__)
  REPO_ROOT = File.expand_path('..', RELEASE_DIR)
  JOB = BoshTemplate::Job.new(File.join(RELEASE_DIR, 'jobs', 'egress-guard'))

  # The agent binary: $EGRESS_GUARD_BIN, else the debug build (tests/run builds it first).
  def egress_guard_bin
    bin = ENV.fetch('EGRESS_GUARD_BIN', File.join(REPO_ROOT, 'target', 'debug', 'egress-guard'))
    assert File.executable?(bin), "no egress-guard binary at #{bin} (cargo build, or set EGRESS_GUARD_BIN)"
    bin
  end

  # Runs `egress-guard check-config` on TOML text; returns [stdout+stderr, success?].
  def check_config(toml)
    Dir.mktmpdir('egress-guard-config') do |dir|
      path = File.join(dir, 'egress-guard.toml')
      File.write(path, toml)
      out, status = Open3.capture2e(egress_guard_bin, 'check-config', '--config', path)
      [out, status.success?]
    end
  end

  def assert_check_config_passes(toml)
    out, ok = check_config(toml)
    assert ok, "egress-guard check-config rejected the rendered config:\n#{out}\n--- config ---\n#{toml}"
    out
  end

  # The rendered TOML only uses `key = <JSON-compatible value>` lines and [tables].
  def parse_simple_toml(text)
    table = result = {}
    text.each_line do |line|
      line = line.strip
      next if line.empty? || line.start_with?('#')

      if (m = line.match(/\A\[\[(\w+)\]\]\z/))
        (result[m[1]] ||= []) << (table = {})
      elsif (m = line.match(/\A\[([\w.]+)\]\z/))
        table = m[1].split('.').reduce(result) { |h, k| h[k] ||= {} }
      elsif (m = line.match(/\A(\w+)\s*=\s*(.+)\z/))
        table[m[1]] = JSON.parse(m[2])
      else
        flunk "unexpected line in rendered TOML: #{line}"
      end
    end
    result
  end

  def render(template, properties = {}, instance: {})
    JOB.render(template, properties, instance: instance)
  end

  def props(egress_guard)
    { 'egress_guard' => egress_guard }
  end
end

require_relative 'test_helper'
require 'socket'

class JobSpecTest < Minitest::Test
  include TestHelper

  REQUIRED = %w[
    egress_guard.enabled egress_guard.overlay_network egress_guard.allowed_networks
    egress_guard.exempt_workloads egress_guard.reconcile_interval egress_guard.health.listen
    egress_guard.log.level egress_guard.log.format egress_guard.metadata_store egress_guard.mode
    egress_guard.dns.enabled egress_guard.dns.allowed_suffixes egress_guard.dns.upstream
    egress_guard.dns.listen egress_guard.dns.max_inflight egress_guard.dns.upstream_timeout
    egress_guard.dns.per_container_tcp_connections egress_guard.dns.per_container_qps
    egress_guard.dns.per_container_burst egress_guard.dns.refuse_with egress_guard.rules
    egress_guard.dns.answer_ttl_min egress_guard.dns.answer_ttl_max
  ].freeze

  def test_every_agent_setting_is_a_property_with_description_and_default
    properties = JOB.spec.fetch('properties')
    REQUIRED.each do |name|
      assert properties.key?(name), "spec lacks #{name}"
      assert_kind_of String, properties[name]['description'], "#{name} has no description"
      refute_empty properties[name]['description'].strip, "#{name} has an empty description"
      assert properties[name].key?('default'), "#{name} has no default"
    end
    properties.each_key { |name| assert name.start_with?('egress_guard.'), "#{name} is outside egress_guard.*" }
  end

  def test_spec_defaults_equal_the_agents_own_defaults
    example = parse_simple_toml(File.read(File.join(REPO_ROOT, 'config', 'egress-guard.toml')))
    defaults = JOB.merged_properties({})['egress_guard']
    %w[enabled overlay_network allowed_networks exempt_workloads metadata_store reconcile_interval mode].each do |key|
      assert_equal example[key], defaults[key], "default of egress_guard.#{key}"
    end
    assert_equal example['log'], defaults['log']
    assert_equal example['health'], defaults['health']
    assert_equal example['dns'], defaults['dns']
    # The certificates are PEM text in the manifest and files the job writes in the config.
    %w[enabled address server_name lines_per_minute].each do |key|
      assert_equal example['loggregator'][key], defaults['loggregator'][key], "default of egress_guard.loggregator.#{key}"
    end
  end

  def test_spec_lists_exactly_the_templates_in_the_job
    on_disk = Dir.children(File.join(JOB.dir, 'templates')).sort
    assert_equal on_disk, JOB.spec.fetch('templates').keys.sort
    assert_equal 'bin/post-start', JOB.spec['templates']['post-start.erb']
    assert_equal %w[egress-guard], JOB.spec.fetch('packages')
    JOB.spec['packages'].each do |pkg|
      assert File.file?(File.join(RELEASE_DIR, 'packages', pkg, 'spec')), "package #{pkg} missing"
    end
  end

  # The agent needs no nft at run time: no package builds one, no job uses one, no blob feeds one.
  def test_no_job_or_package_references_nftables
    packages = Dir.children(File.join(RELEASE_DIR, 'packages')).sort
    # rust-1-linux appears here once vendored (`bosh vendor-package`, see the README).
    assert_equal %w[egress-guard], packages - %w[rust-1-linux]
    packages.each do |pkg|
      spec = YAML.safe_load(File.read(File.join(RELEASE_DIR, 'packages', pkg, 'spec')))
      refute_includes Array(spec['dependencies']), 'nftables', "package #{pkg}"
      Array(spec['files']).each { |glob| refute_match(/nft/, glob, "package #{pkg} files") }
    end
    Dir.children(File.join(RELEASE_DIR, 'jobs')).each do |job|
      spec = YAML.safe_load(File.read(File.join(RELEASE_DIR, 'jobs', job, 'spec')))
      refute_includes Array(spec['packages']), 'nftables', "job #{job}"
    end
    blobs = YAML.safe_load(File.read(File.join(RELEASE_DIR, 'config', 'blobs.yml'))) || {}
    assert_empty blobs.keys.grep(/nft/), 'config/blobs.yml'
    files = Dir.glob('{jobs,packages,config,operations}/**/*', base: RELEASE_DIR)
               .select { |f| File.file?(File.join(RELEASE_DIR, f)) }
    refute_empty files
    files.each do |f|
      text = File.read(File.join(RELEASE_DIR, f))
      refute_match(%r{packages/nftables|sbin/nft\b|\bnftables/\S+\.tar}, text, f)
      # No template or script runs the nft command.
      refute_match(/\bnft\s+(-\w+\s+)*(list|add|create|insert|replace|delete|destroy|flush|monitor|-f)\b/, text, f)
    end
    refute File.exist?(File.join(REPO_ROOT, 'packaging', 'fetch-nft-sources.sh'))
  end

  def test_release_name
    assert_equal 'egress-guard', YAML.safe_load(File.read(File.join(RELEASE_DIR, 'config', 'final.yml')))['name']
  end
end

# What the job's templates rely on, as the director's renderer does it: spec defaults, p() with
# and without a default, undeclared properties, if_p/else, the instance spec.
class RendererSemanticsTest < Minitest::Test
  include TestHelper

  def job_with(properties)
    Dir.mktmpdir do |release|
      dir = File.join(release, 'jobs', 'x')
      FileUtils.mkdir_p(File.join(dir, 'templates'))
      File.write(File.join(dir, 'spec'), YAML.dump('name' => 'x', 'templates' => { 't.erb' => 't' }, 'properties' => properties))
      File.write(File.join(dir, 'monit'), '')
      yield dir
    end
  end

  def render_snippet(properties, manifest, erb)
    job_with(properties) do |dir|
      File.write(File.join(dir, 'templates', 't.erb'), erb)
      BoshTemplate::Job.new(dir).render('t.erb', manifest)
    end
  end

  def test_missing_property_without_default_raises_like_bosh
    err = assert_raises(BoshTemplate::UnknownProperty) do
      render_snippet({ 'a.b' => { 'description' => 'no default' } }, {}, '<%= p("a.b") %>')
    end
    assert_match(/a\.b/, err.message)
  end

  def test_undeclared_property_is_invisible_even_if_in_manifest
    assert_raises(BoshTemplate::UnknownProperty) do
      render_snippet({}, { 'a' => { 'c' => 1 } }, '<%= p("a.c") %>')
    end
  end

  def test_p_with_default_defaults_and_null_manifest_values
    spec = { 'a.b' => { 'description' => 'x' }, 'a.d' => { 'description' => 'y', 'default' => 5 } }
    assert_equal 'fallback 5', render_snippet(spec, { 'a' => { 'd' => nil } }, '<%= p("a.b", "fallback") %> <%= p("a.d") %>')
    assert_equal '7', render_snippet(spec, { 'a' => { 'b' => 7 } }, '<%= p(["a.x", "a.b"]) %>')
  end

  def test_if_p_and_else
    spec = { 'a.b' => { 'description' => 'x' }, 'a.c' => { 'description' => 'y', 'default' => 'c' } }
    erb = '<% if_p("a.b", "a.c") do |b, c| %>both <%= b %> <%= c %><% end.else do %>not set<% end %>'
    assert_equal 'not set', render_snippet(spec, {}, erb)
    assert_equal 'both 1 c', render_snippet(spec, { 'a' => { 'b' => 1 } }, erb)
  end

  def test_spec_object
    out = JOB.render('egress-guard.toml.erb', {}, instance: { 'deployment' => 'cf-iso', 'name' => 'iso-cell', 'id' => 'abc' })
    assert_includes out, 'cf-iso/iso-cell/abc'
  end
end

class ConfigTemplateTest < Minitest::Test
  include TestHelper

  def test_defaults_render_the_agents_defaults_and_pass_check_config
    toml = render('egress-guard.toml.erb')
    config = parse_simple_toml(toml)
    assert_equal true, config['enabled']
    assert_equal '10.255.0.0/16', config['overlay_network']
    assert_equal ['10.0.0.0/8'], config['allowed_networks']
    assert_equal ['staging'], config['exempt_workloads']
    assert_equal '/var/vcap/data/container-metadata/store.json', config['metadata_store']
    assert_equal '10s', config['reconcile_interval']
    assert_equal 'enforce', config['mode']
    assert_equal({ 'level' => 'info', 'format' => 'text' }, config['log'])
    assert_equal({ 'listen' => '127.0.0.1:9851' }, config['health'])
    assert_equal false, config['dns']['enabled']
    assert_equal '169.254.0.2:53', config['dns']['upstream']
    assert_equal KEYS, config.keys.sort
    assert_check_config_passes(toml)
  end

  # Every key the template writes. `nft` is obsolete (the agent speaks nf_tables netlink itself
  # and only warns about the key), so neither the job nor the shipped example may set it.
  KEYS = %w[allowed_networks dns enabled exempt_workloads health log loggregator metadata_store metrics_tls mode overlay_network reconcile_interval].freeze

  def test_no_nft_key_in_the_rendered_config_or_the_example
    [render('egress-guard.toml.erb'),
     render('egress-guard.toml.erb', props('enabled' => false, 'log' => { 'level' => 'debug', 'format' => 'json' })),
     File.read(File.join(REPO_ROOT, 'config', 'egress-guard.toml'))].each do |toml|
      refute_match(/^\s*nft\s*=/, toml)
      config = parse_simple_toml(toml)
      refute config.key?('nft'), 'obsolete key nft'
      assert_equal KEYS, config.keys.sort
    end
  end

  def test_dns_properties_render_and_pass_check_config
    dns = {
      'enabled' => 'true',
      'allowed_suffixes' => ['apps.internal.', 'buildpacks.cloudfoundry.org'],
      'upstream' => '169.254.0.53:53',
      'listen' => '0.0.0.0:5300',
      'max_inflight' => '64',
      'upstream_timeout' => '500ms',
      'per_container_tcp_connections' => '3',
      'per_container_qps' => '50',
      'per_container_burst' => 75,
      'refuse_with' => 'nxdomain',
      'answer_ttl_min' => '10s',
      'answer_ttl_max' => '1h',
    }
    toml = render('egress-guard.toml.erb', props('dns' => dns))
    config = parse_simple_toml(toml)['dns']
    assert_equal true, config['enabled']
    assert_equal ['apps.internal.', 'buildpacks.cloudfoundry.org'], config['allowed_suffixes']
    assert_equal '169.254.0.53:53', config['upstream']
    assert_equal '0.0.0.0:5300', config['listen']
    assert_equal 64, config['max_inflight']
    assert_equal '500ms', config['upstream_timeout']
    assert_equal 3, config['per_container_tcp_connections']
    assert_equal [50, 75], [config['per_container_qps'], config['per_container_burst']]
    assert_equal 'nxdomain', config['refuse_with']
    assert_equal %w[10s 1h], [config['answer_ttl_min'], config['answer_ttl_max']]
    assert_check_config_passes(toml)
    # The agent checks the durations itself (min above max).
    _, ok = check_config(render('egress-guard.toml.erb',
                                props('dns' => { 'answer_ttl_min' => '2h', 'answer_ttl_max' => '1h' })))
    refute ok, 'check-config accepted answer_ttl_min above answer_ttl_max'
    # The agent validates the names itself.
    _, ok = check_config(render('egress-guard.toml.erb', props('dns' => { 'allowed_suffixes' => ['.'] })))
    refute ok, 'check-config accepted the root as an allowed suffix'
    # A privileged DNS port needs NET_BIND_SERVICE, but only when the filter runs.
    caps = lambda { |d| YAML.safe_load(render('bpm.yml.erb', props('dns' => d)))['processes'].first['capabilities'] }
    assert_equal %w[NET_ADMIN NET_BIND_SERVICE], caps.call('enabled' => true, 'listen' => '0.0.0.0:53')
    assert_equal %w[NET_ADMIN], caps.call('enabled' => false, 'listen' => '0.0.0.0:53')
  end

  def test_custom_properties_render_and_pass_check_config
    custom = props(
      'enabled' => false,
      'overlay_network' => '10.254.0.0/16',
      'allowed_networks' => ['10.0.0.0/8', '172.16.4.0/24', '192.168.10.0/24'],
      'exempt_workloads' => %w[staging task],
      'metadata_store' => '/var/vcap/data/cm/store.json',
      'reconcile_interval' => '1m 30s',
      'mode' => 'audit',
      'log' => { 'level' => 'debug', 'format' => 'json' },
      'health' => { 'listen' => '0.0.0.0:19851' },
    )
    toml = render('egress-guard.toml.erb', custom)
    config = parse_simple_toml(toml)
    assert_equal false, config['enabled']
    assert_equal '10.254.0.0/16', config['overlay_network']
    assert_equal ['10.0.0.0/8', '172.16.4.0/24', '192.168.10.0/24'], config['allowed_networks']
    assert_equal %w[staging task], config['exempt_workloads']
    assert_equal '/var/vcap/data/cm/store.json', config['metadata_store']
    assert_equal '1m 30s', config['reconcile_interval']
    assert_equal 'audit', config['mode']
    assert_equal({ 'level' => 'debug', 'format' => 'json' }, config['log'])
    assert_equal({ 'listen' => '0.0.0.0:19851' }, config['health'])
    assert_equal KEYS, config.keys.sort
    assert_check_config_passes(toml)
  end

  def test_empty_lists_pass_check_config
    toml = render('egress-guard.toml.erb', props('allowed_networks' => [], 'exempt_workloads' => []))
    config = parse_simple_toml(toml)
    assert_equal [], config['allowed_networks']
    assert_equal [], config['exempt_workloads']
    assert_check_config_passes(toml)
  end

  def test_enabled_accepts_strings_from_cli_variables
    { 'false' => false, 'FALSE' => false, 'true' => true, ' True ' => true }.each do |given, expected|
      assert_equal expected, parse_simple_toml(render('egress-guard.toml.erb', props('enabled' => given)))['enabled'], given
    end
  end

  def test_strings_are_escaped_for_toml
    odd = "odd \"quoted\" \\ workload\u00e9"
    toml = render('egress-guard.toml.erb', props('exempt_workloads' => ['staging', odd]))
    assert_equal ['staging', odd], parse_simple_toml(toml)['exempt_workloads']
    assert_check_config_passes(toml)
  end

  def test_ipv6_allowed_networks_render_and_pass_check_config
    networks = ['10.0.0.0/8', 'fd00::/8', '2001:db8:1::/48']
    toml = render('egress-guard.toml.erb', props('allowed_networks' => networks))
    assert_equal networks, parse_simple_toml(toml)['allowed_networks']
    assert_check_config_passes(toml)
  end

  def test_ipv6_health_listen_passes_check_config
    assert_check_config_passes(render('egress-guard.toml.erb', props('health' => { 'listen' => '[::1]:9851' })))
  end

  INVALID = {
    'enabled' => ['yes', 1],
    'overlay_network' => ['10.255.0.0/33', 'overlay', ''],
    'allowed_networks' => ['10.0.0.0/8', ['10.0.0.0/8', 'not-a-cidr'], [nil]],
    'exempt_workloads' => ['staging', [1]],
    'metadata_store' => ['/tmp/store.json', 'store.json', '/var/vcap/data/store.json', '/var/vcap/data/x/../../../etc/store.json'],
    'reconcile_interval' => [''],
    'mode' => ['Audit', 'dry-run', '', true],
    'log' => [{ 'level' => 'verbose' }, { 'format' => 'yaml' }],
    'health' => [{ 'listen' => 'localhost:9851' }, { 'listen' => '127.0.0.1' }, { 'listen' => '127.0.0.1:70000' }],
    'dns' => [
      { 'enabled' => 'maybe' }, { 'upstream' => 'bosh-dns:53' }, { 'upstream' => '169.254.0.2' },
      { 'listen' => '[::]:9853' }, { 'max_inflight' => 0 }, { 'max_inflight' => 'lots' },
      { 'refuse_with' => 'drop' }, { 'allowed_suffixes' => 'apps.internal.' }, { 'upstream_timeout' => '' },
      { 'per_container_tcp_connections' => 0 }, { 'per_container_tcp_connections' => 65 },
      { 'per_container_qps' => 0 }, { 'per_container_qps' => '100001' },
      { 'per_container_burst' => 'lots' },
    ],
    'metrics_tls' => [{ 'enabled' => 'yes' }, { 'enabled' => true }, { 'port' => 0 }],
    'loggregator' => [
      { 'enabled' => 'maybe' }, { 'enabled' => true }, { 'enabled' => true, 'ca_cert' => 'not a pem' },
      { 'address' => 'metron:3458' }, { 'lines_per_minute' => 0 }, { 'lines_per_minute' => 61 },
    ],
  }.freeze

  def test_invalid_values_fail_the_render_naming_the_property
    INVALID.each do |key, values|
      values.each do |value|
        err = assert_raises(RuntimeError, "#{key}=#{value.inspect} should not render") do
          render('egress-guard.toml.erb', props(key => value))
        end
        assert_includes err.message, "egress_guard.#{key}", "error for #{key}=#{value.inspect}: #{err.message}"
      end
    end
  end

  def test_mode_reaches_the_agent
    %w[enforce audit].each do |mode|
      toml = render('egress-guard.toml.erb', props('mode' => mode))
      assert_match(/^mode = "#{mode}"$/, toml)
      out, ok = check_config(toml)
      assert ok, out
      assert_match(/^mode = "#{mode}"$/, out, 'check-config prints the effective mode')
    end
  end

  def test_agent_rejects_what_the_template_cannot_check
    # Guards the contract the template relies on: the agent validates durations itself.
    _, ok = check_config(render('egress-guard.toml.erb', props('reconcile_interval' => '2 fortnights')))
    refute ok, 'check-config accepted reconcile_interval "2 fortnights"'
  end
end

class BpmTemplateTest < Minitest::Test
  include TestHelper

  def bpm(properties = {})
    YAML.safe_load(render('bpm.yml.erb', properties))
  end

  def test_defaults
    config = bpm
    assert_equal 1, config['processes'].size
    process = config['processes'].first
    # bpm names the log files after the job and process:
    # /var/vcap/sys/log/egress-guard/egress-guard.{stdout,stderr}.log
    assert_equal 'egress-guard', JOB.name
    assert_equal 'egress-guard', process['name']
    assert_equal '/var/vcap/packages/egress-guard/bin/egress-guard', process['executable']
    assert_equal ['run', '--config', '/var/vcap/jobs/egress-guard/config/egress-guard.toml'], process['args']
    assert_equal 'config/egress-guard.toml', JOB.spec['templates']['egress-guard.toml.erb']
    assert_equal ['NET_ADMIN'], process['capabilities']
    assert_equal [{ 'path' => '/var/vcap/data/container-metadata', 'writable' => false }], process['additional_volumes']
    refute process.key?('unsafe'), 'bpm process must not use unsafe (privileged, unrestricted volumes)'
    refute process.key?('hooks')
  end

  def test_volumes_obey_bpm_rules
    [{}, props('metadata_store' => '/var/vcap/data/cm/sub/store.json')].each do |p|
      bpm(p)['processes'].first['additional_volumes'].each do |volume|
        path = volume['path']
        assert_equal File.expand_path(path), path, 'bpm requires canonical volume paths'
        assert path.start_with?('/var/vcap/data/'), "bpm only mounts below /var/vcap/data: #{path}"
        refute_equal '/var/vcap/data/egress-guard', path, 'conflicts with the job data dir'
        assert_equal false, volume['writable']
        refute volume['allow_executions']
      end
    end
  end

  def test_volume_follows_metadata_store
    volumes = bpm(props('metadata_store' => '/var/vcap/data/cm/store.json'))['processes'].first['additional_volumes']
    assert_equal [{ 'path' => '/var/vcap/data/cm', 'writable' => false }], volumes
  end

  def test_privileged_port_adds_only_net_bind_service
    assert_equal %w[NET_ADMIN NET_BIND_SERVICE], bpm(props('health' => { 'listen' => '127.0.0.1:80' }))['processes'].first['capabilities']
    assert_equal %w[NET_ADMIN], bpm(props('health' => { 'listen' => '0.0.0.0:1024' }))['processes'].first['capabilities']
  end

  def test_rejects_store_outside_var_vcap_data
    assert_raises(RuntimeError) { bpm(props('metadata_store' => '/etc/store.json')) }
  end
end

class MonitTemplateTest < Minitest::Test
  include TestHelper

  def test_defaults
    monit = render('monit')
    assert_includes monit, 'check process egress-guard'
    assert_includes monit, 'with pidfile /var/vcap/sys/run/bpm/egress-guard/egress-guard.pid'
    assert_includes monit, 'start program "/var/vcap/jobs/bpm/bin/bpm start egress-guard"'
    assert_includes monit, 'stop program "/var/vcap/jobs/bpm/bin/bpm stop egress-guard"'
    assert_includes monit, 'group vcap'
    assert_match(/if failed host 127\.0\.0\.1 port 9851 protocol http\s+request "\/healthz"/, monit)
  end

  def test_wildcard_listen_is_probed_on_loopback
    assert_match(/host 127\.0\.0\.1 port 19851 /, render('monit', props('health' => { 'listen' => '0.0.0.0:19851' })))
    assert_match(/host ::1 port 9851 /, render('monit', props('health' => { 'listen' => '[::]:9851' })))
    assert_match(/host 10\.0\.16\.14 port 9851 /, render('monit', props('health' => { 'listen' => '10.0.16.14:9851' })))
  end

  def test_disabled_still_runs_the_agent
    # enabled=false must keep the process running: it removes the table and keeps it removed.
    assert_includes render('monit', props('enabled' => false)), 'check process egress-guard'
  end
end

class PostStartTemplateTest < Minitest::Test
  include TestHelper

  # A tiny HTTP server on an ephemeral loopback port answering /readyz from a list of statuses
  # (the last one repeats) and /status with a fixed body.
  class FakeAgent
    attr_reader :port, :hits

    def initialize(statuses)
      @statuses = statuses.dup
      @hits = 0
      @server = TCPServer.new('127.0.0.1', 0)
      @port = @server.addr[1]
      @thread = Thread.new { serve }
    end

    def serve
      loop do
        client = @server.accept
        request = client.gets.to_s
        while (line = client.gets) && line != "\r\n"; end
        if request.include?('/readyz')
          @hits += 1
          status = @statuses.size > 1 ? @statuses.shift : @statuses.first
          body = status == 200 ? "ready\n" : "rules not installed yet\n"
        else
          status = 200
          body = %({"phase":"reconciling"}\n)
        end
        client.write("HTTP/1.1 #{status} X\r\nContent-Length: #{body.bytesize}\r\nConnection: close\r\n\r\n#{body}")
        client.close
      end
    rescue IOError, Errno::EBADF
      nil
    end

    def stop
      @server.close
      @thread.join(2)
    end
  end

  def run_post_start(listen, timeout)
    script = render('post-start.erb', props('health' => { 'listen' => listen }, 'readiness_timeout' => timeout))
    Dir.mktmpdir do |dir|
      path = File.join(dir, 'post-start')
      File.write(path, script)
      File.chmod(0o755, path)
      started = Time.now
      out, status = Open3.capture2e(path)
      [status.exitstatus, out, Time.now - started]
    end
  end

  def test_renders_valid_bash_with_defaults
    script = render('post-start.erb')
    assert script.start_with?("#!/usr/bin/env bash\n")
    assert_includes script, 'base_url="http://127.0.0.1:9851"'
    assert_includes script, 'timeout_seconds=60'
    _, status = Open3.capture2e('bash', '-n', stdin_data: script)
    assert status.success?
  end

  def test_succeeds_when_ready
    agent = FakeAgent.new([200])
    code, out, = run_post_start("127.0.0.1:#{agent.port}", 5)
    assert_equal 0, code, out
    assert_match(/ready/, out)
  ensure
    agent&.stop
  end

  def test_waits_until_ready
    agent = FakeAgent.new([503, 503, 200])
    code, out, = run_post_start("0.0.0.0:#{agent.port}", 20)
    assert_equal 0, code, out
    assert_equal 3, agent.hits
  ensure
    agent&.stop
  end

  def test_fails_after_the_timeout_when_never_ready
    agent = FakeAgent.new([503])
    code, out, elapsed = run_post_start("127.0.0.1:#{agent.port}", 2)
    assert_equal 1, code, out
    assert_operator elapsed, :<, 10, 'the timeout must bound the wait'
    assert_match(/not ready after 2s.*HTTP 503/, out)
    assert_includes out, 'rules not installed yet'
    assert_includes out, '"phase":"reconciling"'
  ensure
    agent&.stop
  end

  def test_fails_when_nothing_listens
    port = TCPServer.open('127.0.0.1', 0) { |s| s.addr[1] }
    code, out, elapsed = run_post_start("127.0.0.1:#{port}", 2)
    assert_equal 1, code, out
    assert_operator elapsed, :<, 10
    assert_match(/HTTP 000/, out)
  end

  def test_rejects_bad_timeout
    [0, -1, 'soon', 4000].each do |t|
      assert_raises(RuntimeError, t.inspect) { render('post-start.erb', props('readiness_timeout' => t)) }
    end
  end
end

# A table of property combinations, rendered by the director's renderer: modes, DNS on and
# off, IPv4-only and IPv6 allowed ranges, enabled and disabled, each with every other property
# set away from its default in one of them. Every rendered config is one the agent accepts, and
# every property of the spec is set by at least one row.
class PropertyCombinationsTest < Minitest::Test
  include TestHelper

  EVERYTHING_ELSE = {
    'overlay_network' => '10.254.0.0/16',
    'exempt_workloads' => %w[staging],
    'metadata_store' => '/var/vcap/data/silk/container-metadata.json',
    'reconcile_interval' => '5s',
    'log' => { 'level' => 'debug', 'format' => 'json' },
    'health' => { 'listen' => '127.0.0.1:19851' },
    'readiness_timeout' => 30,
    'dns' => {
      'allowed_suffixes' => %w[apps.internal. buildpacks.cloudfoundry.org.],
      'upstream' => '169.254.0.53:53',
      'listen' => '0.0.0.0:9953',
      'max_inflight' => 64,
      'upstream_timeout' => '1500ms',
      'per_container_tcp_connections' => 4,
      'per_container_qps' => 100,
      'per_container_burst' => 150,
      'refuse_with' => 'nxdomain',
      'answer_ttl_min' => '45s',
      'answer_ttl_max' => '10m',
    },
  }.freeze

  RULES = [
    { 'description' => "tenant A's \"peered\" VPC", 'destination' => '172.16.0.0/24', 'protocol' => 'tcp',
      'ports' => '5432,6379-6380', 'orgs' => ['3f5c1f8e-6b8a-4d7e-9c1a-0a1b2c3d4e5f'] },
    { 'destination' => '198.51.100.1-198.51.100.9', 'protocol' => 'udp', 'ports' => 53,
      'spaces' => %w[5a1a1a1a-0000-4000-8000-0000000000a1] },
    { 'destination' => '2001:db8::/32', 'protocol' => 'icmp' },
  ].freeze

  PEM = lambda { |what|
    "-----BEGIN #{what}-----\nMIIB\n-----END #{what}-----"
  }
  LOGGREGATOR_ON = {
    'enabled' => true, 'address' => '127.0.0.1:3459', 'server_name' => 'metron.service',
    'ca_cert' => PEM.call('CERTIFICATE'), 'cert' => PEM.call('CERTIFICATE'),
    'key' => PEM.call('RSA PRIVATE KEY'), 'lines_per_minute' => 10
  }.freeze

  METRICS_TLS_ON = {
    'enabled' => true, 'port' => 19_852, 'server_name' => 'eg-metrics',
    'ca_cert' => PEM.call('CERTIFICATE'), 'cert' => PEM.call('CERTIFICATE'), 'key' => PEM.call('PRIVATE KEY')
  }.freeze

  def rows
    modes = %w[enforce audit]
    networks = [['10.0.0.0/8'], ['10.0.0.0/8', '172.16.0.0/24', 'fd00::/8', '2001:db8:1::/48']]
    modes.product([false, true], networks, [true, false]).each_with_index.map do |(mode, dns, allowed, enabled), i|
      row = { 'mode' => mode, 'allowed_networks' => allowed, 'enabled' => enabled, 'dns' => { 'enabled' => dns } }
      # Loggregator on in every fourth row (with DNS on and off across them).
      row['loggregator'] = LOGGREGATOR_ON if (i % 4).zero?
      row['metrics_tls'] = METRICS_TLS_ON if i % 4 == 1
      row['rules'] = RULES if i % 4 == 2
      i.even? ? deep_merge(EVERYTHING_ELSE, row) : row
    end
  end

  def deep_merge(a, b)
    a.merge(b) { |_, x, y| x.is_a?(Hash) && y.is_a?(Hash) ? deep_merge(x, y) : y }
  end

  def test_every_combination_renders_a_config_the_agent_accepts
    rows.each do |row|
      toml = render('egress-guard.toml.erb', props(row))
      config = parse_simple_toml(toml)
      assert_equal row['mode'], config['mode']
      assert_equal row['enabled'], config['enabled']
      assert_equal row['dns']['enabled'], config.dig('dns', 'enabled')
      assert_equal row['allowed_networks'], config['allowed_networks']
      assert_equal !row['loggregator'].nil?, config.dig('loggregator', 'enabled')
      %w[loggregator_ca.crt.erb loggregator.crt.erb loggregator.key.erb].each do |template|
        rendered = render(template, props(row))
        assert(row['loggregator'].nil? || rendered.include?('-----BEGIN '), template)
      end
      assert_check_config_passes(toml)
      YAML.safe_load(render('bpm.yml.erb', props(row)))
      assert_includes render('monit', props(row)), 'check process egress-guard'
      assert_includes render('post-start.erb', props(row)), '/readyz'
      scrape = YAML.safe_load(render('prom_scraper_config.yml.erb', props(row)))
      assert_equal 'egress-guard', scrape['source_id']
      assert_equal(row['metrics_tls'] ? 'https' : 'http', scrape['scheme'])
      assert_equal(!row['metrics_tls'].nil?, config.dig('metrics_tls', 'enabled'))
      assert_equal (row['rules'] || []).length, (config['rules'] || []).length
    end
  end

  def test_rules_render_as_the_agent_reads_them
    toml = render('egress-guard.toml.erb', props('rules' => RULES))
    config = parse_simple_toml(toml)
    assert_equal "tenant A's \"peered\" VPC", config['rules'][0]['description']
    assert_equal '53', config['rules'][1]['ports'], 'a port number becomes the ports string'
    assert_equal ['5a1a1a1a-0000-4000-8000-0000000000a1'], config['rules'][1]['spaces']
    refute config['rules'][2].key?('ports')
    out, ok = check_config(toml)
    assert ok, out
    assert_includes out, 'destination = "198.51.100.1-198.51.100.9"'
  end

  def test_bad_rules_fail_the_render_or_check_config_naming_the_rule
    {
      [{ 'destination' => '10.1.0.0/16', 'colour' => 'red' }] => /egress_guard.rules\[0\] has unknown keys colour/,
      [{ 'protocol' => 'tcp' }] => /egress_guard.rules\[0\].destination must be a non-empty string/,
      [{ 'destination' => '10.1.0.0/16', 'protocol' => 'sctp' }] => /egress_guard.rules\[0\].protocol must be one of/,
      'not a list' => /egress_guard.rules must be a list/,
    }.each do |rules, message|
      error = assert_raises(RuntimeError) { render('egress-guard.toml.erb', props('rules' => rules)) }
      assert_match message, error.message
    end
    # What only the agent knows: ports with protocol all, a host-bit CIDR, a hostname without
    # the DNS filter.
    [
      [{ 'destination' => '10.1.0.0/16', 'ports' => '80' }],
      [{ 'destination' => '10.1.0.1/16' }],
      [{ 'destination' => 'api.partner.example' }],
    ].each do |rules|
      out, ok = check_config(render('egress-guard.toml.erb', props('rules' => rules)))
      refute ok, "check-config accepted #{rules.inspect}"
      assert_includes out, 'rules[0]'
    end
  end

  def test_hostname_rules_render_and_pass_check_config_with_the_dns_filter
    rules = [{ 'destination' => '*.partner.example', 'protocol' => 'tcp', 'ports' => '443',
               'orgs' => ['3f5c1f8e-6b8a-4d7e-9c1a-0a1b2c3d4e5f'] }]
    toml = render('egress-guard.toml.erb', props('rules' => rules, 'dns' => { 'enabled' => true }))
    assert_equal '*.partner.example', parse_simple_toml(toml)['rules'][0]['destination']
    out, ok = check_config(toml)
    assert ok, out
  end

  def test_every_property_of_the_spec_is_set_by_some_row
    set = rows.flat_map { |row| flatten(props(row)) }.uniq
    missing = JOB.spec.fetch('properties').keys - set
    assert_empty missing, 'properties no row sets'
  end

  def flatten(hash, prefix = nil)
    hash.flat_map do |k, v|
      name = [prefix, k].compact.join('.')
      v.is_a?(Hash) ? flatten(v, name) : [name]
    end
  end
end

# config/prom_scraper_config.yml: what cf-deployment's prom_scraper reads to scrape the agent
# (port as a string, source_id egress-guard, the instance's id, http, /metrics).
class PromScraperConfigTemplateTest < Minitest::Test
  include TestHelper

  def config(properties = {}, instance: {})
    YAML.safe_load(render('prom_scraper_config.yml.erb', props(properties), instance: instance))
  end

  def test_scrapes_the_health_port_on_loopback
    assert_equal({ 'port' => '9851', 'source_id' => 'egress-guard', 'instance_id' => 'cell-0-id',
                   'scheme' => 'http', 'path' => '/metrics' },
                 config({}, instance: { 'id' => 'cell-0-id' }))
    assert_equal '19851', config({ 'health' => { 'listen' => '0.0.0.0:19851' } })['port']
  end

  def test_refuses_an_address_prom_scraper_cannot_reach
    ['10.0.16.14:9851', '[::1]:9851', '[::]:9851'].each do |listen|
      err = assert_raises(RuntimeError, listen) { config({ 'health' => { 'listen' => listen } }) }
      assert_includes err.message, 'egress_guard.health.listen'
    end
  end
end

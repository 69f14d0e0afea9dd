require_relative 'test_helper'

# The project's ops files applied by the real bosh CLI (`bosh interpolate`) onto cf-deployment's
# manifest with its isolation-segment ops file (../shared/tools/bosh/cf-deployment), as an
# operator deploys them. tests/run builds the CLI from ../shared/tools/bosh (target/bosh).
class OpsFilesInterpolateTest < Minitest::Test
  include TestHelper

  SHARED = File.expand_path('../shared/tools/bosh', REPO_ROOT)
  CF = File.join(SHARED, 'cf-deployment')
  ISOLATION = File.join(CF, 'operations', 'add-persistent-isolation-segment-diego-cell.yml')
  GROUP = 'isolated-diego-cell'
  OPS = File.join(RELEASE_DIR, 'operations')

  def bosh
    bin = ENV.fetch('BOSH_CLI', File.join(REPO_ROOT, 'target', 'bosh', 'bin', 'bosh'))
    assert File.executable?(bin), "no bosh CLI at #{bin} (tests/run builds it; or set BOSH_CLI)"
    bin
  end

  # `bosh interpolate BASE ARGS...`; returns its output, failing the test with its message.
  def interpolate(base, *args)
    out, err, status = Open3.capture3(bosh, 'interpolate', base, *args)
    assert status.success?, "bosh interpolate #{base} #{args.join(' ')} failed:\n#{err}#{out}"
    out
  end

  # An ops file with the instance group in its paths resolved, as the ops files' headers say
  # to do first (the CLI applies ops files before it interpolates variables).
  def resolved(dir, name)
    path = File.join(dir, "resolved-#{name}")
    File.write(path, interpolate(File.join(OPS, name), '-v', "egress_guard_instance_group=#{GROUP}"))
    path
  end

  def manifest(*ops_files, vars: {})
    args = [ISOLATION, *ops_files].flat_map { |f| ['-o', f] }
    args += vars.flat_map { |k, v| ['-v', "#{k}=#{v}"] }
    YAML.safe_load(interpolate(File.join(CF, 'cf-deployment.yml'), *args), aliases: true)
  end

  def group(m, name = GROUP)
    m.fetch('instance_groups').find { |g| g['name'] == name } or flunk "no instance group #{name}"
  end

  def job(g, name)
    g.fetch('jobs').find { |j| j['name'] == name }
  end

  VARS = {
    'egress_guard_enabled' => true,
    'egress_guard_release_version' => '0.1.0',
    'egress_guard_dns_port' => 9853,
    'egress_guard_dns_upstream' => '169.254.0.53:53',
  }.freeze

  def test_add_egress_guard_places_the_job_on_the_segment_with_its_toggle
    Dir.mktmpdir do |dir|
      m = manifest(resolved(dir, 'add-egress-guard.yml'), vars: VARS.merge('egress_guard_enabled' => false))
      eg = job(group(m), 'egress-guard')
      refute_nil eg, 'egress-guard is on isolated-diego-cell'
      assert_equal 'egress-guard', eg['release']
      assert_equal false, eg.dig('properties', 'egress_guard', 'enabled')
      assert_includes m['releases'], { 'name' => 'egress-guard', 'version' => '0.1.0' }
      others = m['instance_groups'].reject { |g| g['name'] == GROUP }
      assert(others.none? { |g| job(g, 'egress-guard') }, 'only the segment gets the job')
    end
  end

  # The DNS ops file: the filter on, listening on the port variable, forwarding to the
  # resolver silk gives the segment's containers; and that same port on silk's host-side
  # address in silk-cni's host_tcp_services and host_udp_services of the same group.
  def test_enable_dns_turns_the_filter_on_and_lists_its_listener_for_silk
    Dir.mktmpdir do |dir|
      m = manifest(resolved(dir, 'add-egress-guard.yml'), resolved(dir, 'enable-egress-guard-dns.yml'), vars: VARS)
      g = group(m)
      dns = job(g, 'egress-guard').dig('properties', 'egress_guard', 'dns')
      assert_equal({ 'enabled' => true, 'listen' => '0.0.0.0:9853', 'upstream' => '169.254.0.53:53' }, dns)
      silk = job(g, 'silk-cni').fetch('properties')
      assert_equal ['169.254.0.1:9853'], silk['host_tcp_services']
      assert_equal ['169.254.0.1:9853'], silk['host_udp_services']
      upstream_host = dns['upstream'].split(':').first
      assert_includes silk['dns_servers'], upstream_host,
                      "the filter forwards to the resolver silk gives this segment's containers"
      # The rendered config of this job is one the agent accepts.
      props = job(g, 'egress-guard')['properties']
      assert_check_config_passes(render('egress-guard.toml.erb', props))
    end
  end

  # Nothing else in cf-deployment changes: with our ops files the manifest differs from the one
  # without them only by the release, the job, and (with DNS) silk-cni's two host services.
  def test_nothing_else_in_the_manifest_changes
    Dir.mktmpdir do |dir|
      before = manifest(vars: VARS)
      after = manifest(resolved(dir, 'add-egress-guard.yml'), resolved(dir, 'enable-egress-guard-dns.yml'), vars: VARS)
      after['releases'] = after['releases'].reject { |r| r['name'] == 'egress-guard' }
      g = group(after)
      g['jobs'] = g['jobs'].reject { |j| j['name'] == 'egress-guard' }
      silk = job(g, 'silk-cni')['properties']
      silk.delete('host_tcp_services')
      silk.delete('host_udp_services')
      assert_equal before, after
    end
  end

  # The Loggregator ops file: app log lines on, with cf-deployment's loggregator_tls_agent
  # certificate (a variable the manifest defines, signed by loggregator_ca, named metron).
  def test_enable_loggregator_uses_the_cells_agent_certificate_and_scrapes_metrics_over_tls
    Dir.mktmpdir do |dir|
      m = manifest(resolved(dir, 'add-egress-guard.yml'), resolved(dir, 'enable-egress-guard-loggregator.yml'), vars: VARS)
      logs = job(group(m), 'egress-guard').dig('properties', 'egress_guard', 'loggregator')
      assert_equal({ 'enabled' => true, 'ca_cert' => '((loggregator_tls_agent.ca))',
                     'cert' => '((loggregator_tls_agent.certificate))',
                     'key' => '((loggregator_tls_agent.private_key))' }, logs)
      tls = job(group(m), 'egress-guard').dig('properties', 'egress_guard', 'metrics_tls')
      assert_equal({ 'enabled' => true, 'server_name' => 'egress-guard-metrics',
                     'ca_cert' => '((metric_scraper_ca.certificate))',
                     'cert' => '((egress_guard_metrics_tls.certificate))',
                     'key' => '((egress_guard_metrics_tls.private_key))' }, tls)
      metrics_cert = m['variables'].find { |v| v['name'] == 'egress_guard_metrics_tls' }
      assert_equal 'metric_scraper_ca', metrics_cert.dig('options', 'ca'), 'signed by the CA prom_scraper trusts'
      assert_includes metrics_cert.dig('options', 'alternative_names'), 'egress-guard-metrics'
      scraper = m['variables'].find { |v| v['name'] == 'prom_scraper_scrape_tls' }
      assert_equal 'metric_scraper_ca', scraper.dig('options', 'ca'), "prom_scraper's client certificate has the same CA"
      variable = m['variables'].find { |v| v['name'] == 'loggregator_tls_agent' }
      refute_nil variable, 'cf-deployment defines loggregator_tls_agent'
      assert_equal 'loggregator_ca', variable.dig('options', 'ca')
      assert_includes variable.dig('options', 'alternative_names'), 'metron'
      # With the certificate filled in, the job renders a config the agent accepts.
      pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
      props = Marshal.load(Marshal.dump(job(group(m), 'egress-guard')['properties']))
      props['egress_guard']['loggregator'].merge!('ca_cert' => pem, 'cert' => pem, 'key' => pem)
      props['egress_guard']['metrics_tls'].merge!('ca_cert' => pem, 'cert' => pem, 'key' => pem)
      toml = render('egress-guard.toml.erb', props)
      assert_equal true, parse_simple_toml(toml).dig('loggregator', 'enabled')
      assert_check_config_passes(toml)
    end
  end

  # The toggle reaches the rendered config as the agent reads it, whichever way it is given.
  def test_the_toggle_flows_into_the_rendered_config
    Dir.mktmpdir do |dir|
      ops = resolved(dir, 'add-egress-guard.yml')
      [[true, true], [false, false], ['false', false]].each do |given, expected|
        m = manifest(ops, vars: VARS.merge('egress_guard_enabled' => given))
        toml = render('egress-guard.toml.erb', job(group(m), 'egress-guard')['properties'])
        assert_equal expected, parse_simple_toml(toml)['enabled'], given.inspect
        assert_check_config_passes(toml)
      end
    end
  end

  # Two segments, each with its own toggle, as bosh-release/README.md says: a second segment's
  # cells come from cf-deployment's isolation-segment ops file with the group renamed (as an
  # operator copies it), and each segment's pre-pass maps the toggle to a variable of its own.
  # Applying a segment's ops file twice changes nothing.
  def test_two_segments_have_their_own_toggles
    Dir.mktmpdir do |dir|
      second = File.join(dir, 'second-segment.yml')
      File.write(second, File.read(ISOLATION).gsub(GROUP, 'iso-b-diego-cell'))
      per_segment = lambda do |group, toggle|
        path = File.join(dir, "egress-guard-#{group}.yml")
        File.write(path, interpolate(File.join(OPS, 'add-egress-guard.yml'),
                                     '-v', "egress_guard_instance_group=#{group}",
                                     '-v', "egress_guard_enabled=((#{toggle}))"))
        path
      end
      a = per_segment.call(GROUP, 'iso_a_egress_guard_enabled')
      b = per_segment.call('iso-b-diego-cell', 'iso_b_egress_guard_enabled')
      args = [ISOLATION, second, a, b, a].flat_map { |f| ['-o', f] }
      args += ['-v', 'iso_a_egress_guard_enabled=true', '-v', 'iso_b_egress_guard_enabled=false',
               '-v', 'egress_guard_release_version=0.1.0']
      m = YAML.safe_load(interpolate(File.join(CF, 'cf-deployment.yml'), *args), aliases: true)
      assert_equal 1, m['releases'].count { |r| r['name'] == 'egress-guard' }
      assert_equal 1, group(m).fetch('jobs').count { |j| j['name'] == 'egress-guard' }
      assert_equal true, job(group(m), 'egress-guard').dig('properties', 'egress_guard', 'enabled')
      assert_equal false, job(group(m, 'iso-b-diego-cell'), 'egress-guard').dig('properties', 'egress_guard', 'enabled')
    end
  end

  # Every property an ops file sets on the job is one the job's spec declares (a deploy would
  # otherwise fail on an unknown property only when the template reads it).
  def test_properties_set_by_the_ops_files_are_declared
    declared = JOB.spec['properties'].keys
    Dir.mktmpdir do |dir|
      m = manifest(resolved(dir, 'add-egress-guard.yml'), resolved(dir, 'enable-egress-guard-dns.yml'),
                   resolved(dir, 'enable-egress-guard-loggregator.yml'), vars: VARS)
      flatten(job(group(m), 'egress-guard').fetch('properties')).each do |name|
        assert_includes declared, name
      end
    end
  end

  def flatten(hash, prefix = nil)
    hash.flat_map do |k, v|
      name = [prefix, k].compact.join('.')
      v.is_a?(Hash) ? flatten(v, name) : [name]
    end
  end

  # Bad inputs fail the interpolation, not the deploy: an unresolved group in a path is an
  # error of the CLI (an ops file applied without resolving it first finds no such group).
  def test_an_unresolved_group_fails_the_interpolation
    _out, err, status = Open3.capture3(bosh, 'interpolate', File.join(CF, 'cf-deployment.yml'),
                                       '-o', ISOLATION, '-o', File.join(OPS, 'enable-egress-guard-dns.yml'))
    refute status.success?, 'applying the DNS ops file without resolving the group must fail'
    assert_match(/egress_guard_instance_group|Expected to find/, err)
  end
end

require_relative 'test_helper'
require_relative 'lib/bpm_agent'

# The agent's metrics through Cloud Foundry's own pipeline, with the real programs (built by
# ../shared/tools/loggregator-agent/build.sh; tests/run builds them into target/): the real
# prom-scraper, given the job's rendered config/prom_scraper_config.yml, scrapes the agent
# (run bpm-style in a scratch network namespace) and sends its metrics to the real forwarder
# agent, which hands them to the real syslog agent, whose aggregate drain is a TCP listener of
# this test: egress_guard_* counters and gauges arrive there as RFC 5424 lines with
# source_id egress-guard and the instance's id.
class PromScraperPipelineTest < Minitest::Test
  include BpmAgent

  AGENTS = File.join(TestHelper::REPO_ROOT, 'target', 'loggregator-agent', 'bin')
  DRAIN_PORT = 16_514
  FORWARDER_PORT = 3458
  SYSLOG_AGENT_PORT = 3460

  def setup
    super
    %w[forwarder-agent syslog-agent prom-scraper].each do |program|
      assert File.executable?(File.join(AGENTS, program)),
             "no #{program} in #{AGENTS} (tests/run builds them with ../shared/tools/loggregator-agent/build.sh)"
    end
    skip 'needs openssl' unless have?('openssl')
    make_certificates
  end

  # One test CA; one leaf for every program (server and client auth, SAN DNS:metron, the name
  # clients of the v2 ingress verify).
  def make_certificates
    @certs = File.join(@tmp, 'certs')
    FileUtils.mkdir_p(@certs)
    c = ->(name) { File.join(@certs, name) }
    run!('openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=test-ca',
         '-keyout', c['ca.key'], '-out', c['ca.crt'])
    run!('openssl', 'req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=metron',
         '-keyout', c['leaf.key'], '-out', c['leaf.csr'])
    File.write(c['ext'], "subjectAltName=DNS:metron,DNS:egress-guard-metrics\nextendedKeyUsage=serverAuth,clientAuth\n")
    run!('openssl', 'x509', '-req', '-in', c['leaf.csr'], '-CA', c['ca.crt'], '-CAkey', c['ca.key'],
         '-CAcreateserial', '-days', '2', '-extfile', c['ext'], '-out', c['leaf.crt'])
    # The agent runs as an unprivileged user (bpm) and reads them.
    Dir.children(@certs).each { |f| File.chmod(0o644, c[f]) }
  end

  def tls(prefix)
    { "#{prefix}_CA_FILE_PATH" => File.join(@certs, 'ca.crt'),
      "#{prefix}_CERT_FILE_PATH" => File.join(@certs, 'leaf.crt'),
      "#{prefix}_KEY_FILE_PATH" => File.join(@certs, 'leaf.key') }
  end

  def metrics_env(port)
    { 'METRICS_PORT' => port.to_s }.merge(tls('METRICS'))
  end

  # Starts `argv` in namespace `ns` with `env`, logging to `name`.log; returns the pid.
  def start_in(ns, name, env, *argv)
    Process.spawn(env, 'ip', 'netns', 'exec', ns, *argv,
                  %i[out err] => [File.join(@tmp, "#{name}.log"), 'w'])
  end

  def stop(pids)
    pids.each { |pid| stop_process(pid, 5) }
  end

  def logs
    Dir.glob(File.join(@tmp, '*.log')).map { |f| "--- #{File.basename(f)} ---\n#{File.read(f)[-3000..] || File.read(f)}" }.join("\n")
  end

  def test_the_agents_metrics_reach_a_drain_through_the_real_prom_scraper
    pipeline(tls: false)
  end

  # The same through the mutual-TLS listener (`[metrics_tls]`): prom-scraper scrapes it over
  # https with its client certificate, checking the listener's name.
  def test_the_metrics_reach_the_drain_over_mutual_tls_too
    pipeline(tls: true)
  end

  METRICS_TLS_PORT = 19_852

  def agent_config(tls)
    return write_config({}) unless tls

    pem = ->(f) { File.read(File.join(@certs, f)) }
    path = write_config('metrics_tls' => { 'enabled' => true, 'port' => METRICS_TLS_PORT,
                                           'ca_cert' => pem['ca.crt'], 'cert' => pem['leaf.crt'], 'key' => pem['leaf.key'] })
    # The job writes the PEMs under its config/certs/; here they stay where openssl made them.
    toml = File.read(path)
              .sub(%r{"/var/vcap/jobs/egress-guard/config/certs/metrics_ca.crt"}, JSON.generate(File.join(@certs, 'ca.crt')))
              .sub(%r{"/var/vcap/jobs/egress-guard/config/certs/metrics.crt"}, JSON.generate(File.join(@certs, 'leaf.crt')))
              .sub(%r{"/var/vcap/jobs/egress-guard/config/certs/metrics.key"}, JSON.generate(File.join(@certs, 'leaf.key')))
    File.write(path, toml)
    path
  end

  # Without a client certificate the TLS listener answers nothing; with one, /metrics only.
  def tls_controls(ns)
    curl = ['ip', 'netns', 'exec', ns, 'curl', '-s', '-o', '/dev/null', '-w', '%{http_code}',
            '--cacert', File.join(@certs, 'ca.crt'), '--resolve', "egress-guard-metrics:#{METRICS_TLS_PORT}:127.0.0.1"]
    named = "https://egress-guard-metrics:#{METRICS_TLS_PORT}"
    out, status = Open3.capture2e(*curl, "#{named}/metrics")
    refute status.success? && out == '200', "served /metrics without a client certificate (#{out})"
    with_cert = curl + ['--cert', File.join(@certs, 'leaf.crt'), '--key', File.join(@certs, 'leaf.key')]
    assert_equal '200', Open3.capture2e(*with_cert, "#{named}/metrics").first
    assert_equal '404', Open3.capture2e(*with_cert, "#{named}/healthz").first
  end

  def pipeline(tls:)
    with_netns do |ns|
      with_agent(ns, agent_config(tls), BPM_LIKE) do |_log|
        out, status = Open3.capture2e('ip', 'netns', 'exec', ns, post_start(30))
        assert status.success?, "the agent never became ready:\n#{out}"

        jobs = File.join(@tmp, 'jobs')
        scrape_config = File.join(jobs, 'egress-guard', 'config', 'prom_scraper_config.yml')
        FileUtils.mkdir_p(File.dirname(scrape_config))
        scrape_props = { 'health' => { 'listen' => LISTEN } }
        scrape_props['metrics_tls'] = { 'enabled' => true, 'port' => METRICS_TLS_PORT } if tls
        File.write(scrape_config, render('prom_scraper_config.yml.erb', props(scrape_props),
                                         instance: { 'id' => 'cell-0-id' }))
        assert_equal(tls ? 'https' : 'http', YAML.safe_load(File.read(scrape_config))['scheme'])
        ingress = File.join(@tmp, 'ingress', 'syslog-agent', 'ingress_port.yml')
        FileUtils.mkdir_p(File.dirname(ingress))
        File.write(ingress, "ingress: #{SYSLOG_AGENT_PORT}\n")
        drain = File.join(@tmp, 'drain.txt')
        pids = []
        begin
          pids << start_in(ns, 'drain', {}, 'ruby', '-rsocket', '-e', <<~RUBY, drain)
            server = TCPServer.new('127.0.0.1', #{DRAIN_PORT})
            out = File.open(ARGV[0], 'ab')
            loop do
              Thread.new(server.accept) do |c|
                while (data = (c.readpartial(65_536) rescue nil))
                  out.write(data)
                  out.flush
                end
              end
            end
          RUBY
          pids << start_in(ns, 'syslog-agent',
                           { 'AGENT_PORT' => SYSLOG_AGENT_PORT.to_s,
                             'AGGREGATE_DRAIN_URLS' => "syslog://127.0.0.1:#{DRAIN_PORT}?include-metrics-deprecated=true" }
                             .merge(tls('AGENT')).merge(metrics_env(14_001)),
                           File.join(AGENTS, 'syslog-agent'))
          pids << start_in(ns, 'forwarder-agent',
                           { 'AGENT_PORT' => FORWARDER_PORT.to_s,
                             'DOWNSTREAM_INGRESS_PORT_GLOB' => File.join(@tmp, 'ingress', '*', 'ingress_port.yml') }
                             .merge(tls('AGENT')).merge(metrics_env(14_002)),
                           File.join(AGENTS, 'forwarder-agent'))
          sleep 1
          pids << start_in(ns, 'prom-scraper',
                           { 'LOGGREGATOR_AGENT_ADDR' => "127.0.0.1:#{FORWARDER_PORT}",
                             'CLIENT_CERT_PATH' => File.join(@certs, 'leaf.crt'),
                             'CLIENT_KEY_PATH' => File.join(@certs, 'leaf.key'),
                             'CA_CERT_PATH' => File.join(@certs, 'ca.crt'),
                             'DEFAULT_SOURCE_ID' => 'prom-scraper',
                             'CONFIG_GLOBS' => File.join(jobs, '*', 'config', 'prom_scraper_config.yml'),
                             'SCRAPE_INTERVAL' => '1s',
                             'SCRAPE_CERT_PATH' => File.join(@certs, 'leaf.crt'),
                             'SCRAPE_KEY_PATH' => File.join(@certs, 'leaf.key'),
                             'SCRAPE_CA_CERT_PATH' => File.join(@certs, 'ca.crt') }.merge(metrics_env(14_003)),
                           File.join(AGENTS, 'prom-scraper'))
          arrived = ''
          deadline = Time.now + 40
          until Time.now > deadline
            arrived = File.exist?(drain) ? File.read(drain) : ''
            break if arrived.include?('name="egress_guard_reconciles_total"') &&
                     arrived.include?('name="egress_guard_containers"')
            sleep 0.5
          end
          ours = arrived.lines.select { |l| l.include?('egress_guard_') }
          warn "  at the drain: #{ours.find { |l| l.include?('reconciles_total') }&.strip}" unless ours.empty?
          refute_empty ours, "no egress_guard_ metric reached the drain in 40 s\n#{arrived[-2000..]}\n#{logs}"
          assert(ours.all? { |l| l.include?(' egress-guard [cell-0-id] ') },
                 "source_id egress-guard and the instance id on every line:\n#{ours.first(3).join}")
          assert(ours.any? { |l| l.include?('counter@47450 name="egress_guard_reconciles_total"') },
                 "a counter arrives as a counter:\n#{ours.first(5).join}")
          assert(ours.any? { |l| l.include?('gauge@47450') && l.include?('egress_guard_') },
                 "gauges arrive too:\n#{ours.first(5).join}")
          tls_controls(ns) if tls
        ensure
          stop(pids)
        end
      end
    end
  end
end

require_relative 'packaging_helper'

# Running the agent the way bpm does (an unprivileged user with NET_ADMIN only) in a scratch
# network namespace, with the job's rendered config; shared by the privilege and pipeline tests.
module BpmAgent
  include PackagingHelper

  UNPRIVILEGED = '65534'.freeze
  BPM_LIKE = ['setpriv', "--reuid=#{UNPRIVILEGED}", "--regid=#{UNPRIVILEGED}", '--clear-groups',
              '--inh-caps=-all,+net_admin', '--ambient-caps=-all,+net_admin',
              '--bounding-set=-all,+net_admin', '--no-new-privs'].freeze
  NO_CAPS = ['setpriv', "--reuid=#{UNPRIVILEGED}", "--regid=#{UNPRIVILEGED}", '--clear-groups',
             '--inh-caps=-all', '--bounding-set=-all', '--no-new-privs'].freeze
  LISTEN = '127.0.0.1:19851'.freeze

  def setup
    skip 'needs root, setpriv, ip and nft (to inspect the ruleset)' unless root? && have?('setpriv') && have?('ip') && have?('nft')
    caps = YAML.safe_load(render('bpm.yml.erb'))['processes'].first['capabilities']
    assert_equal ['NET_ADMIN'], caps, 'BPM_LIKE must grant exactly what bpm.yml lists'
    @tmp = Dir.mktmpdir('egress-guard-bpm')
    File.chmod(0o755, @tmp)
    # silk's store: directory and files owned by the agent's user (vcap on a cell), 0700/0600.
    @store_dir = File.join(@tmp, 'container-metadata')
    Dir.mkdir(@store_dir, 0o700)
    File.write(File.join(@store_dir, 'store.json'), JSON.generate(
      'c1' => { 'handle' => 'c1', 'ip' => '10.255.1.2', 'metadata' => { 'container_workload' => 'app', 'app_id' => 'a' } },
      'c2' => { 'handle' => 'c2', 'ip' => '10.255.1.3', 'metadata' => { 'container_workload' => 'staging' } },
    ))
    File.write(File.join(@store_dir, 'store.json_lock'), '')
    File.write(File.join(@store_dir, 'store.json_version'), '2')
    Dir.children(@store_dir).each { |f| File.chmod(0o600, File.join(@store_dir, f)) }
    FileUtils.chown_R(UNPRIVILEGED.to_i, UNPRIVILEGED.to_i, @store_dir)
  end

  def teardown
    FileUtils.rm_rf(@tmp) if @tmp
  end

  # The job's rendered config, with the cell's store path swapped for this machine's.
  def write_config(properties)
    toml = render('egress-guard.toml.erb', props({ 'health' => { 'listen' => LISTEN } }.merge(properties)))
    toml = toml.sub(/^metadata_store = .*$/, "metadata_store = #{JSON.generate(File.join(@store_dir, 'store.json'))}")
    path = File.join(@tmp, 'egress-guard.toml')
    File.write(path, toml)
    File.chmod(0o644, path)
    path
  end

  def post_start(timeout)
    path = File.join(@tmp, 'post-start')
    File.write(path, render('post-start.erb', props('health' => { 'listen' => LISTEN }, 'readiness_timeout' => timeout)))
    File.chmod(0o755, path)
    path
  end

  def with_agent(ns, config, privileges)
    log = File.join(@tmp, 'agent.log')
    pid = Process.spawn('ip', 'netns', 'exec', ns, *privileges, egress_guard_bin, 'run', '--config', config,
                        %i[out err] => [log, 'w'])
    begin
      yield log
    ensure
      stop_process(pid)
    end
  end

  def tables(ns)
    run!('ip', 'netns', 'exec', ns, 'nft', 'list', 'tables')
  end
end

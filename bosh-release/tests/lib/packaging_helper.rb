require_relative '../test_helper'
require 'fileutils'
require 'socket'
require 'timeout'

# Helpers shared by the packaging and privilege tests.
module PackagingHelper
  include TestHelper

  PACKAGING_DIR = File.join(TestHelper::REPO_ROOT, 'packaging')

  def root?
    Process.euid.zero?
  end

  def have?(cmd)
    system('sh', '-c', "command -v #{cmd} >/dev/null 2>&1")
  end

  def run!(*cmd, **opts)
    out, status = Open3.capture2e(*cmd, **opts)
    assert status.success?, "#{cmd.join(' ')} failed (#{status}):\n#{out}"
    out
  end

  # Runs a packaging script the way BOSH does, with a minimal environment; without network
  # access when we can take it away (a fresh network namespace), to prove the build offline.
  def compile(compile_dir, install_dir, extra_env = {})
    env = {
      'PATH' => '/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin',
      'HOME' => compile_dir,
      'LANG' => 'C.UTF-8',
      'BOSH_COMPILE_TARGET' => compile_dir,
      'BOSH_INSTALL_TARGET' => install_dir,
    }.merge(extra_env)
    offline = root? && have?('unshare') ? %w[unshare --net] : []
    started = Time.now
    out, status = Open3.capture2e(env, *offline, 'bash', '-e', 'packaging', chdir: compile_dir, unsetenv_others: true)
    [out, status, Time.now - started, !offline.empty?]
  end

  def with_netns
    skip 'needs root, ip (iproute2) for network namespaces and nft to inspect them' unless root? && have?('ip') && have?('nft')
    @netns_seq = (@netns_seq || 0) + 1
    name = "egtest-#{Process.pid}-#{@netns_seq}"
    run!('ip', 'netns', 'add', name)
    begin
      run!('ip', 'netns', 'exec', name, 'ip', 'link', 'set', 'lo', 'up')
      yield name
    ensure
      system('ip', 'netns', 'del', name, err: File::NULL)
    end
  end

  # Stops a process we started: TERM, then KILL after `grace` seconds.
  def stop_process(pid, grace = 10)
    Process.kill('TERM', pid)
    Timeout.timeout(grace) { Process.wait(pid) }
  rescue Errno::ESRCH, Errno::ECHILD
    nil
  rescue Timeout::Error
    Process.kill('KILL', pid)
    Process.wait(pid)
  end
end

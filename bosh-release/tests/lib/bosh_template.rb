# The director's own template renderer (Bosh::Common::Template, from cloudfoundry/bosh; its
# test API, which the director's rendering shares), found beside the repository in
# ../shared/tools/bosh/bosh-template/lib. Needs Ruby and Debian's ruby-activesupport.
#
# BoshTemplate::Job is only the tests' handle on it: the job's spec (for the tests about the
# spec itself), and render(source, properties, instance:), which renders a template of the job
# by the path the spec gives it, as a deploy does:
# - a template sees the properties its spec declares, with the spec's defaults for what the
#   manifest leaves out or sets to null; p() of one with neither raises UnknownProperty;
# - `spec` is the instance (id, name, index, az, address, ip, deployment, bootstrap, networks).
# monit has no rendered path in a spec (BOSH renders it as the job's monit file): it goes
# through the same template class.
require 'yaml'

SHARED_TEMPLATE_LIB = File.expand_path('../../../../shared/tools/bosh/bosh-template/lib', __dir__)
$LOAD_PATH.unshift(SHARED_TEMPLATE_LIB) unless $LOAD_PATH.include?(SHARED_TEMPLATE_LIB)
begin
  require 'bosh/common/template/test'
rescue LoadError => e
  abort "BOSH's template renderer is not loadable from #{SHARED_TEMPLATE_LIB} (#{e.message}); " \
        'it needs ../shared beside the repository and Debian ruby-activesupport'
end

module BoshTemplate
  UnknownProperty = Bosh::Common::Template::UnknownProperty

  # The instance a template sees unless a test says otherwise.
  DEFAULT_INSTANCE = {
    id: 'c0ffee00-1111-4222-8333-444455556666',
    name: 'isolated-diego-cell',
    index: 0,
    az: 'z1',
    address: '10.0.16.14',
    ip: '10.0.16.14',
    deployment: 'cf',
    bootstrap: true,
    networks: { 'default' => { 'ip' => '10.0.16.14', 'default' => %w[dns gateway] } },
  }.freeze

  class Job
    attr_reader :dir, :spec

    def initialize(dir)
      @dir = dir
      @spec = YAML.safe_load(File.read(File.join(dir, 'spec')))
    end

    def name
      spec.fetch('name')
    end

    # Source template name => destination path, monit included (BOSH renders it too).
    def templates
      { 'monit' => 'monit' }.merge(spec.fetch('templates', {}))
    end

    def render(source, properties = {}, instance: {})
      raise ArgumentError, "#{source} is not a template of job #{name}" unless templates.key?(source)

      instance_spec = Bosh::Common::Template::Test::InstanceSpec.new(
        **DEFAULT_INSTANCE.merge(instance.transform_keys(&:to_sym))
      )
      template = if source == 'monit'
                   Bosh::Common::Template::Test::Template.new(spec, File.join(dir, 'monit'))
                 else
                   release = Bosh::Common::Template::Test::ReleaseDir.new(File.dirname(File.dirname(dir)))
                   release.job(File.basename(dir)).template(templates.fetch(source))
                 end
      template.render(properties, spec: instance_spec)
    end

    # Spec defaults overlaid with the manifest's values, for declared properties only (what
    # the renderer gives a template; for the tests of the spec's defaults).
    def merged_properties(manifest_properties)
      merged = {}
      spec.fetch('properties', {}).each do |name, definition|
        value = BoshTemplate.lookup(manifest_properties, name)
        value = Marshal.load(Marshal.dump(definition['default'])) if value.nil? && definition
        BoshTemplate.store(merged, name, value) unless value.nil?
      end
      merged
    end
  end

  def self.lookup(hash, dotted_name)
    dotted_name.split('.').reduce(hash) do |node, key|
      return nil unless node.is_a?(Hash) && node.key?(key)

      node[key]
    end
  end

  def self.store(hash, dotted_name, value)
    *parents, leaf = dotted_name.split('.')
    node = parents.reduce(hash) { |h, key| h[key] ||= {} }
    node[leaf] = value
  end
end

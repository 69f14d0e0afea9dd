# A small stand-in for the bosh-template gem, on Ruby's standard ERB, for rendering this
# release's job templates in tests. It follows what the director does:
# - a template sees only the properties its job spec declares; a value missing (or null) in the
#   manifest takes the spec default;
# - p(name) raises UnknownProperty for a property with neither value nor default, and for one
#   the spec does not declare; p(name, default) returns default instead; p([a, b]) tries each;
# - if_p(*names) { |*values| } yields only when every property has a value, and returns an
#   object whose #else runs its block when it did not yield;
# - spec exposes the instance (id, name, index, az, address, ip, deployment, bootstrap,
#   networks, job.name, release.name/version) as nested OpenStructs;
# - templates are ERB with trim_mode '-'. Links are not implemented (the job has none).
require 'erb'
require 'ostruct'
require 'yaml'

module BoshTemplate
  class UnknownProperty < StandardError
    def initialize(names)
      super("Can't find property '#{Array(names).join("', or '")}'")
    end
  end

  DEFAULT_SPEC = {
    'id' => 'c0ffee00-1111-4222-8333-444455556666',
    'name' => 'isolated-diego-cell',
    'index' => 0,
    'az' => 'z1',
    'address' => '10.0.16.14',
    'ip' => '10.0.16.14',
    'deployment' => 'cf',
    'bootstrap' => true,
    'networks' => { 'default' => { 'ip' => '10.0.16.14', 'default' => %w[dns gateway] } },
    'job' => { 'name' => 'isolated-diego-cell' },
    'release' => { 'name' => 'egress-guard', 'version' => '0.1.0' },
    'persistent_disk' => 0,
  }.freeze

  # The job as the director sees it: its spec file and its templates.
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
      path = source == 'monit' ? File.join(dir, 'monit') : File.join(dir, 'templates', source)
      raise ArgumentError, "#{source} is not a template of job #{name}" unless templates.key?(source)

      context = Context.new(merged_properties(properties), DEFAULT_SPEC.merge(instance))
      erb = ERB.new(File.read(path), trim_mode: '-')
      erb.filename = path
      erb.result(context.template_binding)
    end

    # Spec defaults overlaid with the manifest's values, for declared properties only.
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

  class ActiveElseBlock
    def initialize(context)
      @context = context
    end

    def else
      yield
    end

    def else_if_p(*names, &block)
      @context.if_p(*names, &block)
    end
  end

  class InactiveElseBlock
    def else; end

    def else_if_p(*)
      InactiveElseBlock.new
    end
  end

  class Context
    def initialize(properties, spec)
      @properties = properties
      @spec = BoshTemplate.to_ostruct(spec)
    end

    attr_reader :spec

    def p(*args)
      names = Array(args[0])
      names.each do |name|
        value = BoshTemplate.lookup(@properties, name)
        return value unless value.nil?
      end
      return args[1] if args.length == 2

      raise UnknownProperty, names
    end

    def if_p(*names)
      values = names.map do |name|
        value = BoshTemplate.lookup(@properties, name)
        return ActiveElseBlock.new(self) if value.nil?

        value
      end
      yield(*values)
      InactiveElseBlock.new
    end

    def link(name)
      raise NotImplementedError, "links are not supported by this test shim (link '#{name}')"
    end

    def if_link(name)
      raise NotImplementedError, "links are not supported by this test shim (if_link '#{name}')"
    end

    def template_binding
      binding
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

  def self.to_ostruct(value)
    case value
    when Hash then OpenStruct.new(value.transform_values { |v| to_ostruct(v) })
    when Array then value.map { |v| to_ostruct(v) }
    else value
    end
  end
end

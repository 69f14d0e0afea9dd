# Just enough of the bosh CLI's manifest handling to test operations/*.yml without the CLI:
# go-patch `replace`/`remove` ops (paths of keys, `name=value` array selectors, `-` append,
# `?` optional segments) and `((var))` interpolation, applied in the CLI's order (ops first,
# then variables, so a variable inside an ops path is never resolved).
require 'yaml'

module Ops
  class Error < StandardError; end

  VAR = /\(\((!?[-.\w]+)\)\)/.freeze
  ANCHORED_VAR = /\A#{VAR}\z/.freeze

  # bosh interpolate TEMPLATE -o OPS... -v VARS: ops applied first, then variables.
  def self.interpolate(document, ops: [], vars: {}, strict: false)
    doc = Marshal.load(Marshal.dump(document))
    ops.each { |op| doc = apply(doc, op) }
    resolve(doc, vars, strict: strict)
  end

  def self.resolve(node, vars, strict: false)
    case node
    when Hash then node.to_h { |k, v| [resolve(k, vars, strict: strict), resolve(v, vars, strict: strict)] }
    when Array then node.map { |v| resolve(v, vars, strict: strict) }
    when String
      if (m = node.match(ANCHORED_VAR))
        name = m[1].delete_prefix('!')
        return vars.fetch(name) if vars.key?(name)
        raise Error, "Expected to find variables: #{name}" if strict

        return node
      end
      node.gsub(VAR) do |whole|
        name = Regexp.last_match(1).delete_prefix('!')
        if vars.key?(name)
          value = vars[name]
          raise Error, "variable #{name} of type #{value.class} cannot be part of a string" unless value.is_a?(String) || value.is_a?(Integer)

          value.to_s
        else
          raise Error, "Expected to find variables: #{name}" if strict

          whole
        end
      end
    else node
    end
  end

  def self.apply(doc, op)
    tokens = op.fetch('path').split('/', -1)
    raise Error, "path must start with /: #{op['path']}" unless tokens.shift == ''

    case op.fetch('type')
    when 'replace' then replace(doc, tokens, Marshal.load(Marshal.dump(op['value'])), op['path'])
    when 'remove' then remove(doc, tokens, op['path'])
    else raise Error, "unsupported op type #{op['type']}"
    end
  end

  # go-patch: a `?` makes its segment and every later one optional (created when missing).
  def self.replace(node, tokens, value, path, optional = false)
    return value if tokens.empty?

    token, *rest = tokens
    optional ||= token.end_with?('?')
    token = token.delete_suffix('?')
    if node.is_a?(Array)
      if token == '-'
        node << (rest.empty? ? value : replace(empty_for(rest.first), rest, value, path, true))
        return node
      end
      index = find_index(node, token, path)
      if index.nil?
        raise Error, "Expected to find array item matching '#{token}' for path '#{path}'" unless optional

        key, val = token.split('=', 2)
        node << (rest.empty? ? value : replace({ key => val }, rest, value, path, optional))
      else
        node[index] = replace(node[index], rest, value, path, optional)
      end
      node
    elsif node.is_a?(Hash)
      unless node.key?(token) || optional || rest.empty?
        raise Error, "Expected to find a map key '#{token}' for path '#{path}'"
      end
      node[token] = replace(node.fetch(token) { empty_for(rest.first) }, rest, value, path, optional)
      node
    else
      raise Error, "cannot descend into #{node.inspect} at '#{token}' for path '#{path}'"
    end
  end

  def self.empty_for(next_token)
    next_token.nil? || !(next_token.include?('=') || next_token == '-') ? {} : []
  end

  def self.remove(node, tokens, path)
    *parents, last = tokens
    parent = parents.reduce(node) do |n, t|
      n.is_a?(Array) ? n.fetch(find_index(n, t.delete_suffix('?'), path) || raise(Error, "no #{t} in #{path}")) : n.fetch(t)
    end
    parent.is_a?(Array) ? parent.delete_at(find_index(parent, last, path)) : parent.delete(last)
    node
  end

  def self.find_index(array, token, path)
    if token =~ /\A\d+\z/
      return token.to_i
    end
    raise Error, "array selector must be key=value, got '#{token}' in '#{path}'" unless token.include?('=')

    key, val = token.split('=', 2)
    matches = array.each_index.select { |i| array[i].is_a?(Hash) && array[i][key].to_s == val }
    raise Error, "Expected to find exactly one matching array item for path '#{path}' but found #{matches.size}" if matches.size > 1

    matches.first
  end

end

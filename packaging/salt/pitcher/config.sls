# The configuration, rendered from pillar pitcher:config. check_cmd runs
# `pitcher -t` (the binary just installed) on the rendered file, written
# beside the real one so that relative includes and certificate paths
# resolve the same; only a file that passes replaces the running one. A
# failed test fails this state, and the reload, upgrade and start states
# that require it do not run: the running node is untouched.
{%- from "pitcher/map.jinja" import pitcher with context %}
{%- set p = pitcher.paths %}
{%- set dir = salt['file.dirname'](p.config) %}

{%- set run_dirs = [salt['file.dirname'](p.pid_file), salt['file.dirname'](p.control_socket)] | unique %}

# check_cmd's temporary file goes here: the directory must exist first.
pitcher-config-dir:
  file.directory:
    - name: {{ dir }}
    - makedirs: True

# The directories of the pid file and the control socket (/run on a
# standard node).
pitcher-run-dir:
  file.directory:
    - names: {{ run_dirs | json }}
    - makedirs: True

pitcher-config:
  file.managed:
    - name: {{ p.config }}
    - source: salt://pitcher/files/pitcher.toml.jinja
    - template: jinja
    - mode: '0644'
    - check_cmd: {{ p.binary }} -t -c
    - tmp_dir: {{ dir }}
    - tmp_ext: .toml
    - require:
      - pitcher-binary
      - pitcher-config-dir

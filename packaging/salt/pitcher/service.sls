# The running service. On a node where it runs: a changed binary is an
# in-place upgrade (`pitcher -s upgrade`: the new master takes over the
# sockets and connections, with a rollback if it fails), a changed
# configuration a reload (`pitcher -s reload`, which waits until every
# worker runs it). Where it does not run, it is started (init script, or
# systemd where the host runs it). Never a stop/start.
{%- from "pitcher/map.jinja" import pitcher with context %}

{%- if pitcher.install.deb %}
pitcher-upgrade:
  test.succeed_without_changes:
    - name: "a package upgrade's postinst upgrades the running master in place"
{%- else %}
pitcher-upgrade:
  cmd.run:
    - name: {{ pitcher.cmd.test }} && {{ pitcher.cmd.upgrade }}
    - onlyif: {{ pitcher.cmd.running }}
    - onchanges:
      - pitcher-binary
    - require:
      - file: pitcher-config
{%- endif %}

pitcher-reload:
  cmd.run:
    - name: {{ pitcher.cmd.reload }}
    - onlyif: {{ pitcher.cmd.running }}
    - onchanges:
      - file: pitcher-config
    - require:
      - pitcher-upgrade

{%- if pitcher.service_manager == 'systemd' %}
pitcher-running:
  service.running:
    - name: pitcher
    - enable: True
    - require:
      - pitcher-reload
{%- else %}
pitcher-running:
  cmd.run:
    - name: {{ pitcher.cmd.init }} start
    - unless: {{ pitcher.cmd.init }} status
    - require:
      - pitcher-reload
      - pitcher-run-dir
{%- endif %}

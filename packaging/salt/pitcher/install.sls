# The binary: from the Debian package built by tools/build-deb.sh
# (pillar pitcher:install:deb), whose postinst itself upgrades a running
# master in place; or a plain executable (pitcher:install:binary) put at
# paths:binary by rename (never written into: a running master's file
# stays intact), with the init script or systemd unit beside it.
{%- from "pitcher/map.jinja" import pitcher with context %}
{%- set p = pitcher.paths %}

{%- if pitcher.install.deb %}
pitcher-binary:
  pkg.installed:
    - name: pitcher
    - sources:
      - pitcher: {{ pitcher.install.deb }}

{%- elif pitcher.install.binary %}
pitcher-binary:
  file.managed:
    - name: {{ p.binary }}
    - source: {{ pitcher.install.binary }}
    - skip_verify: True
    - mode: '0755'
    - makedirs: True

pitcher-log-dir:
  file.directory:
    - name: {{ p.log_dir }}
    - mode: '0750'
    - makedirs: True
    - require_in:
      - file: pitcher-config

{%-   if pitcher.service_manager == 'systemd' %}
pitcher-unit:
  file.managed:
    - name: /etc/systemd/system/pitcher.service
    - source: salt://pitcher/files/pitcher.service
    - mode: '0644'
  cmd.run:
    - name: systemctl daemon-reload
    - onchanges:
      - file: pitcher-unit
{%-   else %}
pitcher-init-script:
  file.managed:
    - name: {{ p.init_script }}
    - source: salt://pitcher/files/pitcher.init
    - mode: '0755'
    - makedirs: True
{%-   endif %}

{%- else %}
pitcher-binary:
  test.fail_without_changes:
    - name: "pillar pitcher:install needs `deb` (a .deb from tools/build-deb.sh) or `binary` (a pitcher executable)"
{%- endif %}

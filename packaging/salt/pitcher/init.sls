# The Pitcher formula: installs the binary, renders and tests the
# configuration, starts the service, and on later runs reloads it (changed
# configuration) or upgrades it in place (changed binary); never a
# stop/start. Settings: pillar `pitcher` (packaging/salt/pillar.example).
include:
  - pitcher.install
  - pitcher.config
  - pitcher.service

#!/usr/bin/env bash
# Adds Pitcher nodes to a traffic entry in one command: applies the Salt
# formula packaging/salt/pitcher to every HOST (install, configuration
# tested with `pitcher -t` before it is put in place, start; on a node that
# already runs, a reload or an in-place binary upgrade, never a restart).
#
#   tools/scale-out.sh [options] HOST...
#
#   --pillar-root DIR  the pillar of the entry (top.sls + pitcher.sls, see
#                      packaging/salt/pillar.example); default /srv/pillar
#   --user USER        ssh user (salt-ssh mode); default root
#   --key FILE         ssh private key (salt-ssh mode); default salt-ssh's own
#   --master           go through a running Salt master (`salt -L HOST,...
#                      state.apply pitcher`; its file_roots must include
#                      packaging/salt) instead of salt-ssh
#   --dry-run          print what would run (and the salt-ssh roster)
#
# Default mode is salt-ssh (no minion needed on the new node, only ssh
# access and Python 3): a roster of the HOSTs is written to a temporary
# Salt configuration whose file root is this repository's packaging/salt.
# With the pillar's install:deb pointing at salt://pitcher/dist/..., put the
# .deb from tools/build-deb.sh under packaging/salt/pitcher/dist/ first.
# Exit status: salt's (non-zero when a state failed on any node).
set -euo pipefail
cd "$(dirname "$0")/.."
formula=$PWD/packaging/salt

pillar_root=/srv/pillar
ssh_user=root
ssh_key=
mode=ssh
dry=0
hosts=()
while [ $# -gt 0 ]; do
    case "$1" in
        --pillar-root) pillar_root=$2; shift 2 ;;
        --user) ssh_user=$2; shift 2 ;;
        --key) ssh_key=$2; shift 2 ;;
        --master) mode=master; shift ;;
        --dry-run) dry=1; shift ;;
        -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
        -*) echo "scale-out.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) hosts+=("$1"); shift ;;
    esac
done
if [ ${#hosts[@]} -eq 0 ]; then
    echo "usage: tools/scale-out.sh [--pillar-root DIR] [--user USER] [--master] [--dry-run] HOST..." >&2
    exit 2
fi
list=$(IFS=,; echo "${hosts[*]}")

if [ "$mode" = master ]; then
    cmd=(salt --state-output=changes -L "$list" state.apply pitcher)
    if [ "$dry" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
    exec "${cmd[@]}"
fi

conf=$(mktemp -d "${TMPDIR:-/tmp}/pitcher-scale-out.XXXXXX")
trap 'rm -rf "$conf"' EXIT
{
    echo "root_dir: $conf/root"
    echo "file_roots: {base: [\"$formula\"]}"
    echo "pillar_roots: {base: [\"$pillar_root\"]}"
} >"$conf/master"
for h in "${hosts[@]}"; do
    printf '%s:\n  host: %s\n  user: %s\n' "$h" "$h" "$ssh_user"
    [ -z "$ssh_key" ] || printf '  priv: %s\n' "$ssh_key"
done >"$conf/roster"
cmd=(salt-ssh --config-dir "$conf" --roster-file "$conf/roster" --state-output=changes -L "$list" state.apply pitcher)
if [ "$dry" = 1 ]; then
    cat "$conf/master" "$conf/roster"
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
"${cmd[@]}"

# shellcheck shell=bash
# tools/lib/origin.sh — the origin and the two free ports the instruction
# and allocation counters (tools/callgrind.sh, tools/allocs.sh) share
# (sourced, bash only).

# pick_ports: sets OP (the origin's port) and PP (the proxy's), two free
# loopback ports.
pick_ports() {
    read -r OP PP < <(python3 -c 'import socket;a=socket.socket();a.bind(("127.0.0.1",0));b=socket.socket();b.bind(("127.0.0.1",0));print(a.getsockname()[1],b.getsockname()[1])')
}

# start_origin DIR PORT: one nginx worker on 127.0.0.1:PORT answering a
# small body on every path, 64 KiB on /64k and 1 MiB on /1m, its files in DIR; sets NG
# to its pid (the caller stops it by that pid).
start_origin() {
    local d=$1 port=$2
    mkdir -p "$d/www"
    head -c 65536 /dev/zero | tr '\0' x >"$d/www/64k"
    head -c 1048576 /dev/zero | tr '\0' y >"$d/www/1m"
    chmod -R a+rX "$d"
    cat >"$d/nginx.conf" <<N
worker_processes 1; daemon off; pid $d/nginx.pid; error_log $d/error.log warn;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $d/cb; proxy_temp_path $d/p; fastcgi_temp_path $d/f; uwsgi_temp_path $d/u; scgi_temp_path $d/s;
 keepalive_requests 1000000;
 server { listen 127.0.0.1:$port; root $d/www; location / { return 200 "Hello from the origin!"; } location = /64k { } location = /1m { } } }
N
    /usr/sbin/nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" &
    NG=$!
}

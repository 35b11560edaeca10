#!/bin/sh
# Runs a command in a new network namespace whose only interface is loopback (up), for the Ray tests: Ray binds
# every interface whatever address it is given, and probes outside addresses (cloud metadata, DNS) at start even
# with usage stats off. As root `unshare --net` does it; elsewhere user namespaces (--map-root-user) may.
# ONNXPIPE_RAY_NAMESPACE tells the tests they are meant to run here: a refusal to start Ray is then a failure.
set -e
inner='ip link set lo up && exec "$@"'
if unshare --net true 2>/dev/null; then
    exec env ONNXPIPE_RAY_NAMESPACE=1 unshare --net sh -c "$inner" sh "$@"
elif unshare --net --map-root-user true 2>/dev/null; then
    exec env ONNXPIPE_RAY_NAMESPACE=1 unshare --net --map-root-user sh -c "$inner" sh "$@"
fi
echo "loopback_only.sh: cannot make a network namespace here (unshare --net needs root or user namespaces);" >&2
echo "the Ray tests only run inside one: run them on a machine that allows it" >&2
exit 1

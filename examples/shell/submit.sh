#!/bin/sh
# Send one Dispatch job with Debian's amqp-tools (rabbitmq-c 0.11) and wait for its result zip.
#
# Usage: submit.sh URL POOL CMD [ARGUMENTS]
#   URL        amqp://user:pass@host:port with no trailing "/": rabbitmq-c reads a trailing "/"
#              as the empty vhost and cannot parse "//"; ".../%2f" names the "/" vhost
#   POOL       the pool: the routing key on exchange dispatch.jobs
#   CMD        the program the worker runs
#   ARGUMENTS  one shell-like string the worker splits, as HTCondor's Arguments
# Environment: RESULT (where the zip goes, default ./JOBID.zip), WAIT_S (default 300).
# Prints key=value lines; exits 0 with a result, 3 when none came within WAIT_S, 1 on errors.
#
# What amqp-tools cannot do, so what this script cannot know:
# - amqp-publish sets string headers, reply_to and persistence, not message_id, correlation_id
#   or priority: the job id rides in the JobId header, and replies carry it as correlation id.
# - amqp-publish never sets mandatory: if no worker has declared the pool's queue yet, the job is
#   dropped without an error and this script waits until WAIT_S runs out.
# - amqp-consume and amqp-get hand over the body only, never headers or properties: JobState,
#   ExitCode and Reason are out of reach. Finality is read from the body instead: Running and
#   Rejected replies are empty, the final Exited (or Removed) reply is the zip of the job's
#   working directory. An empty reply is "Running or Rejected"; a rejected job is only noticed
#   as no zip within WAIT_S, and a zip does not say whether the command succeeded.
set -eu

if [ $# -lt 3 ]; then
    sed -n '4,11p' "$0" >&2
    exit 2
fi
url=$1 pool=$2 cmd=$3 args=${4-}
job_id="sh-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
reply_queue="dispatch.reply.$job_id"
result=${RESULT:-./$job_id.zip}
body=$(mktemp)
trap 'rm -f "$body"' EXIT

# Durable, so replies survive this script; amqp-declare-queue cannot add x-expires, so the
# queue is deleted below once the result is in (and left behind when WAIT_S runs out).
amqp-declare-queue -u "$url" -d -q "$reply_queue" >/dev/null
amqp-publish -u "$url" -e dispatch.jobs -r "$pool" -p -t "$reply_queue" -b "" \
    -H "JobId: $job_id" -H "Cmd: $cmd" -H "Arguments: $args"
echo "job_id=$job_id"
echo "reply_queue=$reply_queue"

deadline=$(( $(date +%s) + ${WAIT_S:-300} ))
while :; do
    left=$(( deadline - $(date +%s) ))
    rc=0
    # One reply per run: amqp-consume pipes the body into `cat`, then acks the message.
    [ "$left" -gt 0 ] && timeout "$left" amqp-consume -u "$url" -q "$reply_queue" -c 1 -p 1 \
        -- sh -c 'cat > "$0"' "$body" || rc=$?
    if [ "$left" -le 0 ] || [ "$rc" -eq 124 ]; then
        echo "state=unknown"   # still running, rejected, or the pool has no queue
        exit 3
    fi
    [ "$rc" -eq 0 ] || exit 1
    if [ -s "$body" ]; then
        mv "$body" "$result"
        echo "state=Exited"    # or Removed: both carry the zip, only headers tell them apart
        echo "result=$result"
        amqp-delete-queue -u "$url" -q "$reply_queue" >/dev/null
        exit 0
    fi
    echo "reply=empty"         # Running or Rejected: amqp-consume cannot show JobState
done

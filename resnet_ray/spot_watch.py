"""The spot-reclaim watcher of a cluster node: ``python -m resnet_ray.spot_watch`` (cluster.yaml starts it on every
worker node).

AWS tells a spot instance two minutes before it reclaims it, in the instance metadata
(``/latest/meta-data/spot/instance-action``, 404 until then). Ray does not read that notice on VMs started by
``ray up``; this watcher does, and drains its own node with reason preemption and the notice's deadline
(``ray drain-node``). Ray Train then sees a preemption (``ray.train.get_preemption_info``): the workers checkpoint
the epoch they are on, and the restart counts against ``train.max_preemptions``, not ``train.max_failures``.
On an on-demand node the notice never comes and the watcher just polls.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Optional

log = logging.getLogger(__name__)

METADATA_URL = "http://169.254.169.254"  # EC2's instance metadata service (link-local, IMDSv2)
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_S = 21600


def notice(base_url: str, timeout_s: float = 2.0) -> Optional[dict]:
    """The spot interruption notice ({"action": "terminate" | "stop" | "hibernate", "time": ISO 8601 UTC}), or None
    while there is none (404). IMDSv2: a session token first."""
    token_request = urllib.request.Request(
        f"{base_url}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)}
    )
    with urllib.request.urlopen(token_request, timeout=timeout_s) as response:
        token = response.read().decode()
    request = urllib.request.Request(f"{base_url}{NOTICE_PATH}", headers={"X-aws-ec2-metadata-token": token})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def seconds_left(action: dict, now: Optional[float] = None) -> int:
    """Whole seconds from now to the notice's reclaim time (at least 1)."""
    when = datetime.datetime.fromisoformat(action["time"].replace("Z", "+00:00")).timestamp()
    return max(1, int(when - (time.time() if now is None else now)))


def drain_command(action: dict, deadline_s: int) -> list:
    """`ray drain-node` for this node, with reason preemption and the notice's deadline."""
    return [
        "ray",
        "drain-node",
        "--reason=DRAIN_NODE_REASON_PREEMPTION",
        f"--reason-message=spot interruption notice: {action.get('action', 'terminate')} at {action['time']}",
        f"--deadline-remaining-seconds={deadline_s}",
    ]


def watch(
    base_url: str = METADATA_URL,
    interval_s: float = 5.0,
    run: Callable[[list], int] = lambda command: subprocess.run(command, check=False).returncode,
    max_polls: Optional[int] = None,
) -> Optional[dict]:
    """Poll for a notice every ``interval_s``; on one, drain this node (``run`` runs the command) and return the
    notice. Unreachable metadata (a blip, or not on EC2) is logged once and polled again."""
    polls, failing = 0, False
    while max_polls is None or polls < max_polls:
        polls += 1
        try:
            action = notice(base_url)
            failing = False
        except (OSError, ValueError) as exc:
            if not failing:
                log.warning("spot watch: cannot read the instance metadata at %s: %s; trying again", base_url, exc)
            failing, action = True, None
        if action is not None:
            deadline_s = seconds_left(action)
            command = drain_command(action, deadline_s)
            log.warning("spot watch: %s; draining this node (%d s left): %s", action, deadline_s, " ".join(command))
            returncode = run(command)
            if returncode != 0:
                log.error("spot watch: `%s` exited with %d", " ".join(command), returncode)
            return action
        time.sleep(interval_s)
    return None


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metadata-url", default=METADATA_URL, help="the instance metadata service")
    parser.add_argument("--interval-s", type=float, default=5.0, help="seconds between polls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    watch(args.metadata_url, args.interval_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The spot-reclaim watcher against a stand-in for EC2's instance metadata service on 127.0.0.1 (IMDSv2)."""

import http.server
import json
import threading

import pytest

from resnet_ray import spot_watch

NOTICE = {"action": "terminate", "time": "2026-12-07T10:00:00Z"}


@pytest.fixture
def metadata():
    """IMDSv2 on a free loopback port: a token for a PUT, then 404 for the notice until ``state["notice"]``."""
    state = {"notice": None, "polls": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            self.send_response(200 if ok else 400)
            self.end_headers()
            self.wfile.write(b"token-1")

        def do_GET(self):
            state["polls"] += 1
            if self.headers.get("X-aws-ec2-metadata-token") != "token-1":
                self.send_response(401)
                self.end_headers()
                return
            if self.path != spot_watch.NOTICE_PATH or state["notice"] is None or state["polls"] < 3:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(json.dumps(state["notice"]).encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_a_notice_drains_this_node_once_with_reason_preemption_and_its_deadline(metadata, monkeypatch):
    url, state = metadata
    state["notice"] = NOTICE
    monkeypatch.setattr(spot_watch.time, "time", lambda: 1796637600.0 - 110)  # 110 s before the notice's time
    commands = []
    found = spot_watch.watch(url, interval_s=0.01, run=lambda c: commands.append(c) or 0, max_polls=10)
    assert found == NOTICE and state["polls"] == 3  # two polls without a notice, then the notice
    assert commands == [
        [
            "ray",
            "drain-node",
            "--reason=DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message=spot interruption notice: terminate at 2026-12-07T10:00:00Z",
            "--deadline-remaining-seconds=110",
        ]
    ]


def test_no_notice_means_no_drain(metadata):
    url, _ = metadata
    commands = []
    assert spot_watch.watch(url, interval_s=0.01, run=commands.append, max_polls=4) is None
    assert commands == []


def test_unreachable_metadata_is_logged_once_and_polled_again(caplog):
    commands = []
    found = spot_watch.watch("http://127.0.0.1:9", interval_s=0.01, run=commands.append, max_polls=3)
    assert found is None and commands == []
    assert len([r for r in caplog.records if "cannot read the instance metadata" in r.message]) == 1


def test_a_notice_whose_time_has_passed_still_gets_a_deadline():
    assert spot_watch.seconds_left(NOTICE, now=1796637600.0 + 30) == 1

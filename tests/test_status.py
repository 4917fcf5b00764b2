"""`serverctl status` against a real server: the figures it shows are those of the requests
sent while it watched; plus its Prometheus text parser and bucket interpolation alone."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from certificates import Authority
from test_security import TOKENS, token_file

from conftest import free_port
from models import ECHO, write_repository
from tiffin.clients import InferenceClient
from tiffin.clients.client import InferenceServerError
from tiffin.server.commands.prometheus_text import Sample, histogram_quantile, parse, parse_line
from tiffin.server.commands.status import Scrape, default_metrics_url, figures

# Runs serverctl with the `status` verb registered, whether or not server/cli.py lists it yet.
HARNESS = """
import sys
from tiffin.server import cli
from tiffin.server.commands import status
cli.VERBS.setdefault("status", status)
sys.exit(cli.main())
"""
FAIL = ECHO.replace("toy_backends:Echo", "toy_backends:Fail")
# Drift monitoring whose reference is the first 50 rows, judged on the newest 50.
WATCHED = ECHO + "monitoring: {sample_rate: 1.0, window: 50, capture_first: 50}\n"
# The test's own flags decide, not what the caller's environment says.
ENV = {k: v for k, v in os.environ.items() if k not in ("TIFFIN_TOKEN", "TIFFIN_METRICS_URL")}
RATE = 40.0  # requests per second sent to echo while status watches
BAD_RATE = 10.0  # failing requests per second sent to fail


def serverctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", HARNESS, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


class Load:
    """Requests at a steady pace from a background thread, until stopped."""

    def __init__(self, url: str, model: str, value: float, rate: float) -> None:
        self.url, self.model, self.value, self.rate = url, model, value, rate
        self.sent = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, daemon=True)

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.seconds = time.monotonic() - self.started

    def _send(self) -> None:
        x = np.full((1, 2), self.value, np.float32)
        with InferenceClient(self.url, timeout=10) as client:
            while not self._stop.is_set():
                due = self.started + self.sent / self.rate
                self._stop.wait(max(0.0, due - time.monotonic()))
                try:
                    client.infer(self.model, {"INPUT0": x})
                except InferenceServerError:
                    self.failed += 1
                self.sent += 1


def test_status_shows_what_was_sent(make_server, tmp_path: Path) -> None:
    repo = write_repository(tmp_path / "repo", {"echo": ECHO, "fail": FAIL, "watched": WATCHED})
    server = make_server(repo)
    remote = ("--url", server.url, "--metrics-url", server.metrics_url)
    # The reference from N(0, 1), then traffic from N(5, 1): the PSI gauge says it drifted.
    rng = np.random.default_rng(7)
    with InferenceClient(server.url, timeout=10) as client:
        for mean in [0.0] * 50 + [5.0] * 50:
            client.infer("watched", {"INPUT0": rng.normal(mean, 1, (1, 2)).astype(np.float32)})

    with Load(server.url, "echo", 1.0, RATE) as good, Load(server.url, "fail", -1.0, BAD_RATE):
        time.sleep(0.5)  # both paced before status's first scrape
        watched = serverctl("status", *remote, "--once", "--json", "--interval", "2")
    assert watched.returncode == 0, watched.stderr
    rows = {(r["model"], r["version"]): r for r in json.loads(watched.stdout)}
    assert set(rows) == {("echo", "1"), ("fail", "1"), ("watched", "1")}

    echo = rows["echo", "1"]
    assert echo["state"] == "READY"
    sent_rate = good.sent / good.seconds
    assert 0.6 * sent_rate <= echo["requests_per_second"] <= 1.4 * sent_rate, (echo, sent_rate)
    assert 0 < echo["p50_seconds"] <= echo["p99_seconds"] < 1.0
    assert echo["mean_batch_size"] >= 1
    assert echo["errors_per_second"] == 0
    assert echo["queue_depth"] is not None and echo["queue_depth"] >= 0
    assert echo["drift_score"] is None  # no monitoring section: no drift gauge

    fail = rows["fail", "1"]
    assert fail["state"] == "READY"
    assert fail["errors_per_second"] > 0.3 * BAD_RATE
    assert fail["errors_per_second"] == pytest.approx(fail["requests_per_second"])

    # At rest: nothing asked in the interval, nothing queued, no latency to show.
    rest = serverctl("status", *remote, "--once", "--json", "--interval", "0.5")
    assert rest.returncode == 0, rest.stderr
    at_rest = {(r["model"], r["version"]): r for r in json.loads(rest.stdout)}
    assert at_rest["watched", "1"]["drift_score"] > 0.2  # PSI_DRIFTED
    idle = at_rest["echo", "1"]
    assert idle["requests_per_second"] == 0 and idle["errors_per_second"] == 0
    assert idle["queue_depth"] == 0
    assert idle["p50_seconds"] is None and idle["p99_seconds"] is None
    assert idle["mean_batch_size"] is None

    table = serverctl("status", *remote, "--once", "--interval", "0.2")
    assert table.returncode == 0, table.stderr
    assert "echo" in table.stdout and "fail" in table.stdout and "READY" in table.stdout
    assert "req/s" in table.stdout and not table.stdout.lstrip().startswith("[")

    # Watching until Ctrl-C: the table is shown, and the interrupt ends it quietly.
    live = subprocess.Popen(
        [sys.executable, "-c", HARNESS, "status", *remote, "--interval", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    time.sleep(4)
    live.send_signal(signal.SIGINT)
    out, err = live.communicate(timeout=20)
    assert live.returncode == 0, err
    assert "echo" in out and "Traceback" not in err

    bad_metrics = f"http://127.0.0.1:{free_port()}/metrics"
    unserved = serverctl("status", "--url", server.url, "--metrics-url", bad_metrics, "--once")
    assert unserved.returncode == 1
    assert f"cannot read metrics from {bad_metrics}" in unserved.stderr


def test_status_over_tls_with_a_token(make_server, tmp_path: Path) -> None:
    repo = write_repository(tmp_path / "repo", {"echo": ECHO})
    ca = Authority(tmp_path / "pki")
    cert = ca.issue("server", "localhost", server=True)
    server = make_server(
        repo,
        *("--grpc-use-ssl", "--grpc-server-cert", str(cert.cert)),
        *("--grpc-server-key", str(cert.key)),
        *("--auth-token-file", str(token_file(tmp_path))),
        credentials=grpc.ssl_channel_credentials(ca.cert.read_bytes()),
    )
    (tmp_path / "token").write_text(TOKENS["reader"] + "\n")
    remote = ("--url", server.url, "--ssl", "--root-cert", str(ca.cert))
    metrics = ("--metrics-url", server.metrics_url, "--once", "--json", "--interval", "0.2")

    answer = serverctl("status", *remote, *metrics, "--token-file", str(tmp_path / "token"))
    assert answer.returncode == 0, answer.stderr
    assert [(r["model"], r["state"]) for r in json.loads(answer.stdout)] == [("echo", "READY")]
    refused = serverctl("status", *remote, *metrics)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    assert f"cannot read the repository index from {server.url}" in refused.stderr


def test_status_of_an_unreachable_server_is_a_sentence() -> None:
    url = f"127.0.0.1:{free_port()}"
    answer = serverctl("status", "--url", url, "--once", "--json", "--interval", "0.1")
    assert answer.returncode == 1
    assert f"serverctl status: error: cannot read the repository index from {url}" in answer.stderr
    assert "Traceback" not in answer.stderr and answer.stdout == ""

    for flags, sentence in (
        (("--interval", "0"), "--interval must be more than 0 seconds, not 0."),
        (("--json",), "--json prints one set of rows: it needs --once."),
        (("--metrics-url", "file:///etc/hostname"), "is not an http:// or https:// URL."),
    ):
        usage = serverctl("status", "--url", url, *flags)
        assert usage.returncode == 2 and sentence in usage.stderr, usage.stderr


def test_parser_reads_escapes_and_special_values() -> None:
    text = r"""# HELP tiffin_requests_total Inference requests answered.
# TYPE tiffin_requests_total counter
tiffin_requests_total{model="a \"quoted\" name",version="1",status="OK"} 12
tiffin_requests_total{model="back\\slash",version="1",note="two\nlines",} 3 1700000000000
up 1
nan_gauge{model="m"} NaN
inf_gauge{le="+Inf"} +Inf
neg_gauge -Inf
  spaced { a = "1" , b="2" }   4.5e-3
broken{model="unclosed} 1
no_value{model="m"}
1bad_name 3
"""
    samples = parse(text)
    by_name = {s.name: s for s in samples}
    assert set(by_name) == {
        "tiffin_requests_total", "up", "nan_gauge", "inf_gauge", "neg_gauge", "spaced",
    }  # fmt: skip
    first, second = (s for s in samples if s.name == "tiffin_requests_total")
    assert first.labels == {"model": 'a "quoted" name', "version": "1", "status": "OK"}
    assert first.value == 12
    assert second.labels == {"model": "back\\slash", "version": "1", "note": "two\nlines"}
    assert second.value == 3  # the timestamp is not the value
    assert by_name["up"] == Sample("up", {}, 1.0)
    assert math.isnan(by_name["nan_gauge"].value)
    assert by_name["inf_gauge"].labels == {"le": "+Inf"}
    assert by_name["inf_gauge"].value == math.inf and by_name["neg_gauge"].value == -math.inf
    assert by_name["spaced"] == Sample("spaced", {"a": "1", "b": "2"}, 4.5e-3)
    assert parse_line('x{a="1"}2') is None  # a value must be set apart


def test_histogram_quantile_interpolates_as_prometheus() -> None:
    buckets = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (math.inf, 40.0)]
    # rank 20 lies half way through (0.1, 0.5]'s 20 observations.
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.3)
    # rank 39.6: 9.6 of the 10 in (0.5, 1].
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.98)
    # Within the first bucket the lower bound is 0; order of the buckets does not matter.
    assert histogram_quantile(0.25, list(reversed(buckets))) == pytest.approx(0.1)
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.02)
    # Past every finite bound: the largest finite bound, as Prometheus answers.
    assert histogram_quantile(0.5, [(1.0, 1.0), (math.inf, 10.0)]) == 1.0
    # No observations, or no +Inf bucket: nothing to say (Prometheus' NaN).
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.5, [(1.0, 3.0)]) is None
    # A count that dips (two series read a moment apart) is taken as cumulative.
    assert histogram_quantile(0.5, [(1.0, 4.0), (2.0, 3.0), (math.inf, 4.0)]) == 0.5


def _scrape(text: str, at: float) -> Scrape:
    return Scrape(parse(text), at)


def test_figures_from_two_scrapes() -> None:
    labels = 'model="m",version="1"'
    before = _scrape(
        f"""tiffin_requests_total{{{labels},protocol="grpc",status="OK"}} 100
tiffin_requests_total{{{labels},protocol="grpc",status="INTERNAL"}} 5
tiffin_request_duration_seconds_bucket{{{labels},le="0.01"}} 50
tiffin_request_duration_seconds_bucket{{{labels},le="0.1"}} 105
tiffin_request_duration_seconds_bucket{{{labels},le="+Inf"}} 105
tiffin_batch_size_sum{{{labels}}} 105
tiffin_batch_size_count{{{labels}}} 100
""",
        at=10.0,
    )
    after = _scrape(
        f"""tiffin_requests_total{{{labels},protocol="grpc",status="OK"}} 120
tiffin_requests_total{{{labels},protocol="grpc",status="INTERNAL"}} 5
tiffin_requests_total{{{labels},protocol="rest",status="INVALID_ARGUMENT"}} 4
tiffin_requests_total{{model="other",version="1",protocol="grpc",status="OK"}} 999
tiffin_request_duration_seconds_bucket{{{labels},le="0.01"}} 50
tiffin_request_duration_seconds_bucket{{{labels},le="0.1"}} 129
tiffin_request_duration_seconds_bucket{{{labels},le="+Inf"}} 129
tiffin_batch_size_sum{{{labels}}} 153
tiffin_batch_size_count{{{labels}}} 112
tiffin_queue_depth{{{labels},priority="1"}} 2
tiffin_queue_depth{{{labels},priority="2"}} 3
tiffin_drift_score{{{labels},tensor="x",feature="0",method="psi"}} 0.05
tiffin_drift_score{{{labels},tensor="x",feature="1",method="psi"}} 0.31
tiffin_drift_score{{{labels},tensor="x",feature="1",method="ks"}} 0.9
""",
        at=12.0,
    )
    states = [("m", "1", "READY"), ("m", "2", "UNAVAILABLE"), ("broken", "", "UNAVAILABLE")]
    served, unserved, broken = figures(states, before, after)
    assert served.requests_per_second == pytest.approx(24 / 2)
    assert served.errors_per_second == pytest.approx(4 / 2)
    # 24 new observations, all in (0.01, 0.1]: p50 at rank 12 of 24.
    assert served.p50_seconds == pytest.approx(0.01 + 0.09 * 12 / 24)
    assert served.p99_seconds == pytest.approx(0.01 + 0.09 * 23.76 / 24)
    assert served.mean_batch_size == pytest.approx(48 / 12)
    assert served.queue_depth == 5
    assert served.drift_score == pytest.approx(0.31)  # the max over features, PSI only
    assert unserved.state == "UNAVAILABLE" and unserved.requests_per_second is None
    assert unserved.p50_seconds is None and unserved.queue_depth is None
    assert broken.version == "" and broken.drift_score is None


def test_default_metrics_url_is_the_grpc_host_on_port_8002() -> None:
    assert default_metrics_url("127.0.0.1:8001") == "http://127.0.0.1:8002/metrics"
    assert default_metrics_url("models.example:443") == "http://models.example:8002/metrics"
    assert default_metrics_url("[::1]:8001") == "http://[::1]:8002/metrics"
    assert default_metrics_url("localhost") == "http://localhost:8002/metrics"

"""What announcing every change costs: purchases while the service delivers their events to a
webhook endpoint (``purchases_webhook``, against ``purchases`` without one), and how fast one
``konvert events publish`` publishes a backlog (``publish``, against purchases per second).

The endpoint is a real local HTTP receiver (uvicorn serving ``receiver:app``, answering 204 to
every POST), in a process of its own so that its CPU is counted apart. Like the rest of the
harness this imports nothing of konvert: it uses the install's HTTP API, CLI and tables, and an
install without events (an older baseline) is measured without them.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from harness import stats
from harness.service import CLI_TIMEOUT_SECONDS, Sampler, free_port, http_json
from harness.side import Side

ENDPOINT_ID = "bench"
_HARNESS = Path(__file__).resolve().parent


class Receiver:
    """The webhook receiver process: started once, counts what it received (GET /)."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self._log = log_path.open("ab")
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "receiver:app",
                "--app-dir",
                str(_HARNESS),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            stdout=self._log,
            stderr=self._log,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.received()
                return
            except (OSError, RuntimeError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.process.kill()
                    raise RuntimeError("the webhook receiver did not start") from None
                time.sleep(0.1)

    def received(self) -> int:
        if self.process.poll() is not None:
            raise RuntimeError(f"the webhook receiver exited with {self.process.returncode}")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=5) as response:
            return int(response.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def has_events(side: Side) -> bool:
    return bool(stats.fetchval(side.database_url, "select to_regclass('outbox_events') is not null"))


def attach_endpoint(side: Side, receiver: Receiver) -> bool:
    """Register the receiver as an endpoint for every event type, through the API; False for an
    install without webhooks."""
    assert side.server is not None
    status, _ = http_json(
        "PUT", f"{side.server.base_url}/v1/webhook-endpoints/{ENDPOINT_ID}", side.api_key, {"url": receiver.url}
    )
    return status in (200, 201)


def detach_endpoint(side: Side) -> None:
    assert side.server is not None
    http_json("DELETE", f"{side.server.base_url}/v1/webhook-endpoints/{ENDPOINT_ID}", side.api_key)


def message_counts(side: Side) -> dict[str, int]:
    """The bench endpoint's webhook messages by status."""
    rows = asyncio.run(
        stats.query(
            side.database_url,
            "select status, count(*)::bigint from webhook_messages where endpoint_id = $1 group by status",
            ENDPOINT_ID,
        )
    )
    return {row[0]: row[1] for row in rows}


def webhook_beside(side: Side, receiver: Receiver, received_before: int) -> dict:
    """After purchases_webhook's load: what the service delivered meanwhile, and what is left."""
    counts = message_counts(side)
    return {
        "received": receiver.received() - received_before,
        "messages": counts,
        "pending_after_load": counts.get("pending", 0),
    }


def _publish(side: Side, sampler: Sampler) -> float:
    started = time.perf_counter()
    process = subprocess.Popen(
        [*side.konvert, "events", "publish"], env=side.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sampler.label(process.pid, "publisher")
    out, err = process.communicate(timeout=CLI_TIMEOUT_SECONDS)
    if process.returncode != 0:
        raise RuntimeError(f"konvert events publish failed ({process.returncode}):\n{(out + err).strip()[-2000:]}")
    return time.perf_counter() - started


# Every event published again from the start, to the stream and to one endpoint (the receiver):
# the publishers' cursors back to the start (positions since sql/0009, a transaction id and an
# event id in a baseline from before), the messages gone, the endpoint in SQL (the service is
# stopped by now).
_REPUBLISH = """
do $$ begin
    if exists (select 1 from information_schema.columns where table_name = 'event_cursors' and column_name = 'position')
    then update event_cursors set position = 0 where name <> 'sequencer';
    else execute $u$update event_cursors set xid = '0', event_id = 0$u$;
    end if;
end $$;
delete from webhook_messages;
delete from webhook_endpoints;
insert into webhook_endpoints (endpoint_id, url, secret) values ('{endpoint}', '{url}', '{secret}');
"""


def run_publish(side: Side, receiver: Receiver) -> dict | None:
    """One ``konvert events publish`` over every event the run's scenarios announced: to the
    stream, fanned out and delivered to the receiver. None for an install without events."""
    if not has_events(side):
        return None
    side.say("publish: `konvert events publish` over every event of the run, to the stream and one endpoint")
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    stats.execute(side.database_url, _REPUBLISH.format(endpoint=ENDPOINT_ID, url=receiver.url, secret=secret))
    stats.flush_redis(side.redis_url)
    events = int(stats.fetchval(side.database_url, "select count(*) from outbox_events"))
    received_before = receiver.received()
    with Sampler(None, side.database_name) as sampler:
        sampler.label(receiver.process.pid, "receiver")
        seconds = _publish(side, sampler)
    delivered = receiver.received() - received_before
    counts = message_counts(side)
    result = {
        "events": events,
        "seconds": round(seconds, 2),
        "events_per_second": round(events / seconds, 1) if seconds > 0 else 0.0,
        "delivered": delivered,
        "messages": counts,
        "usage": sampler.usage.as_dict(),
    }
    side.say(
        f"  {events:,} events in {seconds:.1f} s: {result['events_per_second']:,.0f}/s published "
        f"(stream and webhook), {delivered:,} delivered"
    )
    return result

"""Helpers of compose/cluster-test.sh: timed propagation checks, the MQTT
fan-out check (paho), the WAMP call and event checks (autobahn) and the
loader for the rolling restart. Standard library and Debian's
python3-paho-mqtt and python3-autobahn only; every wait is bounded.

  probe.py route ADMIN TOKEN NAME NODE_URL...     register a route on one node, time it serving on each
  probe.py until STATUS HEADER NODE_URL...        time until each URL answers STATUS
  probe.py mqtt PUB_HOST:PORT SUB_HOST:PORT USER PASSWORD N
  probe.py wamp CALLEE_URL CALLER_URL SUBSCRIBER_URL N   realm1 over WebSocket: calls B -> A, events B -> C
  probe.py load OUT TOKEN NAME=URL[,URL]...       GET a node's URLs in turn, in a loop, until OUT.stop exists
  probe.py judge OUT WINDOWS                      which failures are acceptable (refused on the restarting node)
"""
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse


def request(url, method="GET", headers=None, body=None, timeout=3):
    """One request on a new connection: (status, body) or raises."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, u.path + (("?" + u.query) if u.query else ""), body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def status_of(url, headers=None):
    try:
        return request(url, headers=headers)[0]
    except OSError:
        return None


def wait_all(urls, expect, headers=None, start=None, limit=20.0):
    """Polls every URL until it answers `expect`; milliseconds since start for each (None: not within limit)."""
    start = start or time.monotonic()
    left = dict(enumerate(urls))
    took = [None] * len(urls)
    while left and time.monotonic() - start < limit:
        for i, url in list(left.items()):
            if status_of(url, headers) == expect:
                took[i] = (time.monotonic() - start) * 1000
                del left[i]
        time.sleep(0.005)
    return took


def show(took, names):
    return ", ".join(f"{n} {t:.0f} ms" if t is not None else f"{n} NOT SERVED" for n, t in zip(names, took))


def cmd_route(admin, token, name, *nodes):
    route = {"name": name, "match": {"path_prefix": f"/{name}/"}, "strip_prefix": True,
             "upstream": {"targets": ["http://tasks.bar:8080"]}, "auth": "none"}
    start = time.monotonic()
    status, body = request(admin + "/admin/routes", "POST",
                           {"Authorization": "Bearer " + token, "Content-Type": "application/json"},
                           json.dumps(route))
    if status != 201:
        sys.exit(f"POST /admin/routes answered {status}: {body.decode(errors='replace')}")
    took = wait_all([n + f"/{name}/" for n in nodes], 200, start=start)
    print(show(took, [n.split(":")[-1] for n in nodes]))
    sys.exit(0 if all(t is not None for t in took) else 1)


def cmd_until(expect, header, *urls):
    headers = dict([header.split(": ", 1)]) if header else None
    took = wait_all(list(urls), int(expect), headers)
    print(show(took, [u.split("/")[2] for u in urls]))
    sys.exit(0 if all(t is not None for t in took) else 1)


def mqtt_client(cid, user, password, clean=True):
    """A paho 3.1.1 client; `connected` is set on CONNACK, `present` says
    whether the broker had a session for it."""
    import paho.mqtt.client as mqtt
    try:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311,
                        clean_session=clean)
    except AttributeError:  # paho 1.x
        c = mqtt.Client(client_id=cid, protocol=mqtt.MQTTv311, clean_session=clean)
    c.username_pw_set(user, password)
    c.connected = threading.Event()
    c.present = None

    def on_connect(cl, ud, flags, rc, *rest):
        if rc == 0:
            cl.present = flags["session present"] if isinstance(flags, dict) else flags.session_present
            cl.connected.set()
    c.on_connect = on_connect
    return c


def mqtt_start(c, addr, what):
    host, port = addr.split(":")
    c.connect(host, int(port), keepalive=30)
    c.loop_start()
    if not c.connected.wait(10):
        sys.exit(f"{what} could not connect to {addr}")


def cmd_session(first, second, publisher, user, password, n):
    """A persistent session made on `first` follows its client to
    `second`: what was published (on `publisher`) while it was away
    arrives there, and CONNACK says the session is present."""
    n = int(n)
    topic = f"{user}/cluster/session"
    cid = f"mover-{os.getpid()}"
    got, done, subscribed = [], threading.Event(), threading.Event()
    s = mqtt_client(cid, user, password, clean=False)
    s.on_subscribe = lambda *a: subscribed.set()
    mqtt_start(s, first, "the subscriber")
    s.subscribe(topic, qos=1)
    if not subscribed.wait(10):
        sys.exit(f"no SUBACK from {first}")
    s.disconnect()
    s.loop_stop()
    p = mqtt_client(f"pub-{os.getpid()}", user, password)
    mqtt_start(p, publisher, "the publisher")
    infos = [p.publish(topic, str(i), qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(timeout=20)
    s = mqtt_client(cid, user, password, clean=False)

    def on_message(c, userdata, msg):
        got.append(int(msg.payload))
        if len(set(got)) >= n:
            done.set()
    s.on_message = on_message
    start = time.monotonic()
    mqtt_start(s, second, "the subscriber, again")
    done.wait(20)
    took = time.monotonic() - start
    s.disconnect(); s.loop_stop(); p.disconnect(); p.loop_stop()
    missing = sorted(set(range(n)) - set(got))
    print(f"session made on {first}, {n} QoS 1 messages queued for it meanwhile (published on {publisher}); "
          f"its client back on {second}: session present {s.present}, {len(set(got))} received in "
          f"{took * 1000:.0f} ms, in order: {got == sorted(got)}")
    if not s.present or missing or got != sorted(got):
        print(f"missing: {missing[:20]}")
        sys.exit(1)


def cmd_mqtt(pub, sub, user, password, n):
    n = int(n)
    topic = f"{user}/cluster/fanout"
    got, seen_dup = [], [0]
    subscribed, done = threading.Event(), threading.Event()

    def client(cid):
        return mqtt_client(cid, user, password)

    def on_message(c, userdata, msg):
        if msg.dup:
            seen_dup[0] += 1
        got.append(int(msg.payload))
        if len(got) >= n:
            done.set()

    s = client(f"sub-{os.getpid()}")
    s.on_message = on_message
    s.on_subscribe = lambda *a: subscribed.set()
    host, port = sub.split(":")
    s.connect(host, int(port), keepalive=30)
    s.loop_start()
    if not s.connected.wait(10):
        sys.exit(f"the subscriber could not connect to {sub}")
    s.subscribe(topic, qos=1)
    if not subscribed.wait(10):
        sys.exit("the subscriber on the far node got no SUBACK")
    # No pause: a SUBACK means the far node's subscription is on the bus.
    p = client(f"pub-{os.getpid()}")
    host, port = pub.split(":")
    p.connect(host, int(port), keepalive=30)
    p.loop_start()
    if not p.connected.wait(10):
        sys.exit(f"the publisher could not connect to {pub}")
    start = time.monotonic()
    infos = [p.publish(topic, str(i), qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(timeout=20)
    acked = time.monotonic() - start
    done.wait(20)
    took = time.monotonic() - start
    p.loop_stop(); s.loop_stop(); p.disconnect(); s.disconnect()
    unacked = sum(1 for i in infos if not i.is_published())
    missing = sorted(set(range(n)) - set(got))
    in_order = got == sorted(got)
    print(f"{n} QoS 1 messages published on {pub} (all PUBACKed in {acked * 1000:.0f} ms, {unacked} not acked), "
          f"{len(set(got))} received on {sub} in {took * 1000:.0f} ms ({len(set(got)) / took:.0f} msg/s), "
          f"{len(got) - len(set(got))} duplicates, in order: {in_order}")
    if unacked or missing or not in_order:
        print(f"missing: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        sys.exit(1)


def wamp_join(url, realm="realm1"):
    """A joined autobahn session (asyncio, WebSocket) on `url`; raises if the join fails."""
    import asyncio
    from autobahn.asyncio.wamp import ApplicationSession
    from autobahn.asyncio.websocket import WampWebSocketClientFactory
    from autobahn.wamp.types import ComponentConfig

    loop = asyncio.get_running_loop()
    joined = loop.create_future()

    class Session(ApplicationSession):
        def onJoin(self, details):
            joined.done() or joined.set_result(self)

        def onLeave(self, details):
            joined.done() or joined.set_exception(RuntimeError(f"join refused: {details.reason} {details.message or ''}"))
            self.disconnect()

    u = urllib.parse.urlsplit(url)

    async def connect():
        factory = WampWebSocketClientFactory(lambda: Session(ComponentConfig(realm)), url=url)
        await loop.create_connection(factory, u.hostname, u.port)
        return await joined
    return asyncio.wait_for(connect(), 10)


def cmd_wamp(callee_url, caller_url, sub_url, n):
    """A callee on one node, a caller on another (the call crosses NATS),
    then events published on the caller's node to a subscriber on a third."""
    import asyncio
    from autobahn.wamp.exception import ApplicationError
    from autobahn.wamp.types import PublishOptions
    n = int(n)
    name = lambda url: urllib.parse.urlsplit(url).port
    # autobahn's repr of an ApplicationError leaves the error URI out.
    why = lambda e: f"{e.error}: {e.args[0] if e.args else ''}" if isinstance(e, ApplicationError) else repr(e)

    async def main():
        callee = await wamp_join(callee_url)
        caller = await wamp_join(caller_url)
        sub = await wamp_join(sub_url)
        served = [0]

        def add(a, b):
            served[0] += 1
            return a + b
        await callee.register(add, "com.example.add")
        # The registration reaches the bus (a NATS queue group) a moment
        # after REGISTERED: until then the caller's node knows no callee.
        start = time.monotonic()
        first_error = None
        while True:
            try:
                if await asyncio.wait_for(caller.call("com.example.add", 2, 3), 5) == 5:
                    break
            except (ApplicationError, asyncio.TimeoutError) as e:
                first_error = first_error or e
            if time.monotonic() - start > 10:
                sys.exit(f"a call from {name(caller_url)} was not served by the callee on {name(callee_url)} "
                         f"within 10 s: {why(first_error)}")
            await asyncio.sleep(0.02)
        reachable = (time.monotonic() - start) * 1000
        took = []
        for i in range(n):
            t = time.monotonic()
            try:
                r = await asyncio.wait_for(caller.call("com.example.add", i, 1), 5)
            except (ApplicationError, asyncio.TimeoutError) as e:
                sys.exit(f"call {i + 1} of {n} from {name(caller_url)} to the callee on {name(callee_url)} failed: {why(e)}")
            took.append((time.monotonic() - t) * 1000)
            if r != i + 1:
                sys.exit(f"call {i + 1} of {n}: com.example.add({i}, 1) answered {r!r}")
        if served[0] != n + 1:
            sys.exit(f"the callee on {name(callee_url)} served {served[0]} calls, {n + 1} were made")
        took.sort()
        # Nobody registered this one anywhere: an error at once, no hang.
        t = time.monotonic()
        try:
            await asyncio.wait_for(caller.call("com.example.nobody"), 5)
            sys.exit("com.example.nobody answered although nobody registered it")
        except ApplicationError as e:
            missing = f"{e.error} in {(time.monotonic() - t) * 1000:.0f} ms"

        got, done = [], asyncio.Event()

        def on_event(i):
            got.append(i)
            len(got) >= n and done.set()
        await sub.subscribe(on_event, "com.example.topic")
        t = time.monotonic()
        for i in range(n):
            await caller.publish("com.example.topic", i, options=PublishOptions(acknowledge=True))
        try:
            await asyncio.wait_for(done.wait(), 10)
        except asyncio.TimeoutError:
            pass
        events_ms = (time.monotonic() - t) * 1000
        for s in (callee, caller, sub):
            s.leave()
        print(f"{n} calls from {name(caller_url)} served by the callee on {name(callee_url)}: "
              f"median {took[len(took) // 2]:.1f} ms, p90 {took[int(len(took) * 0.9)]:.1f} ms, "
              f"max {took[-1]:.1f} ms (first served {reachable:.0f} ms after REGISTERED); "
              f"unregistered: {missing}; {len(got)} of {n} events published on {name(caller_url)} "
              f"reached the subscriber on {name(sub_url)} in {events_ms:.0f} ms, in order: {got == sorted(got)}")
        if got != list(range(n)):
            sys.exit(1)
    asyncio.run(main())


def cmd_load(out, token, *targets):
    """One thread per node: GET on a new connection each time; every outcome logged with its time."""
    headers = {"Authorization": "Bearer " + token}
    lock = threading.Lock()
    log = open(out, "w")

    def worker(name, urls):
        urls = urls.split(",")
        i = 0
        while not os.path.exists(out + ".stop"):
            url = urls[i % len(urls)]
            i += 1
            t = time.time()
            try:
                status, _ = request(url, headers=headers, timeout=5)
                kind = "ok" if status == 200 else f"status {status}"
            except ConnectionRefusedError:
                kind = "refused"
            except Exception as e:  # reset, closed without answer, timeout...
                kind = type(e).__name__
            with lock:
                log.write(f"{t:.3f} {name} {kind.replace(' ', '_')}\n")
            if kind != "ok":
                time.sleep(0.01)

    threads = [threading.Thread(target=worker, args=t.split("=", 1)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()


MEANING = {
    "RemoteDisconnected": "the node accepted the connection, then closed it without an answer",
    "ConnectionResetError": "the connection was reset",
    "TimeoutError": "no answer within 5 s",
    "timeout": "no answer within 5 s",
}


# On the node being restarted: a refused connect, or a connection the
# kernel resets when the listening socket closes with it still in the
# listen queue (never accepted, so nothing of it was read). Both are safe
# to retry; an accepted connection closed without an answer is not.
RESTART_OK = ("refused", "ConnectionResetError")


def cmd_judge(out, windows):
    """Failures are acceptable only as refused (or never-accepted, reset)
    connects on the node being restarted."""
    spans = []
    for line in open(windows):
        node, a, b = line.split()
        spans.append((node, float(a), float(b)))
    counts, bad, refused = {}, [], {}
    for line in open(out):
        t, node, kind = line.split()
        t = float(t)
        c = counts.setdefault(node, {})
        c[kind] = c.get(kind, 0) + 1
        if kind == "ok":
            continue
        if kind == "refused":
            first, last = refused.get(node, (t, t))
            refused[node] = (min(first, t), max(last, t))
        restarting = any(n == node and a <= t <= b for n, a, b in spans)
        if not (kind in RESTART_OK and restarting):
            why = MEANING.get(kind, "")
            bad.append(f"{node} {kind}{' (' + why + ')' if why else ''} at "
                       f"{time.strftime('%H:%M:%S', time.localtime(t))}{f'{t % 1:.3f}'[1:]}"
                       f"{' while it restarted' if restarting else ''}")
    total = sum(sum(c.values()) for c in counts.values())
    for node in sorted(counts):
        window = (f"; refused from the first to the last for {(refused[node][1] - refused[node][0]) * 1000:.0f} ms"
                  if node in refused else "")
        print(f"  {node}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts[node].items())) + window)
    print(f"  {total} requests, {total - sum(c.get('ok', 0) for c in counts.values())} failed, "
          f"{len(bad)} not acceptable (anything but a refused or reset connect on the node being restarted)")
    for b in bad[:20]:
        print("  not acceptable: " + b)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1].replace("-", "_")](*sys.argv[2:])

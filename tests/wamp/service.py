#!/usr/bin/python3
"""autobahn-python clients of tollgate's WAMP router, for tests/it/wamp_autobahn.rs.

    service.py MODE CONFIG_JSON

Every mode prints one JSON object per line on stdout (flushed); the
long-lived ones (auth, logger, app) exit when stdin closes. The modes:

  auth      an authenticator service of the Crossbar micro-services example:
            joins realm `crossbar` and registers com.example.authenticate and
            com.example.authorize (round robin), and joins realm `logger` as a
            node to log there
  logger    a log daemon: subscribes to the `logger` realm's session meta
            events and to com.example.log
  app       an application joining again and again (one line per join) until
            `stop` on stdin; `mark` on stdin marks the joins that follow
  joins     one join per entry of CONFIG.joins, all at once
  matrix    a caller and callee per transport and serializer, all calling and
            publishing to each other
  features  the Advanced Profile through autobahn: progressive results, cancel,
            timeout, pattern-based subscriptions and registrations, publisher
            exclusion, black/white listing, disclosure, the meta API

A connection is given as {port, kind: rawsocket|websocket, serializer,
tls: {ca, cert, key}?, realm, auth: {method, authid?, ticket?, secret?,
privkey?}}.
"""

import asyncio
import json
import os
import socket
import ssl
import sys

from autobahn.asyncio.component import Component
from autobahn.asyncio.rawsocket import PrefixProtocol
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.interfaces import IAuthenticator
from autobahn.wamp.types import (CallOptions, CallResult, PublishOptions,
                                 RegisterOptions, SubscribeOptions)

TIMEOUT = 10

# autobahn 22.7.1's asyncio RawSocket lacks the `transport_details` its
# session reads on WELCOME (crossbario/autobahn-python#1592, fixed after
# 22.7.1 by #1593): add it as the fix does.
if not hasattr(PrefixProtocol, 'transport_details'):
    PrefixProtocol.transport_details = property(lambda self: self._transport_details)


def emit(**line):
    print(json.dumps(line, default=repr), flush=True)


class TlsAuth:
    """HELLO with `authmethods: [tls]`: the client certificate is the credential."""
    name = 'tls'
    authextra = {}

    def __init__(self, authid=None):
        self._args = {'authid': authid} if authid else {}

    def on_challenge(self, session, challenge):
        raise RuntimeError('tls authentication has no challenge')

    def on_welcome(self, session, authextra):
        return None


IAuthenticator.register(TlsAuth)


def tls_context(tls):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(tls['ca'])
    if tls.get('cert'):
        ctx.load_cert_chain(tls['cert'], tls['key'])
    return ctx


def tls_probe(c):
    """How a bare TLS connection like `c`'s fails (autobahn only says the
    connection closed): the alert the router sends."""
    try:
        with socket.create_connection(('127.0.0.1', c['port']), timeout=5) as raw:
            with tls_context(c['tls']).wrap_socket(raw, server_hostname='127.0.0.1') as s:
                s.sendall(b'\x7f\xf1\x00\x00')  # a RawSocket handshake
                return 'answered: {!r}'.format(s.recv(4))
    except (OSError, ssl.SSLError) as e:
        return '{}: {}'.format(type(e).__name__, getattr(e, 'reason', None) or e)


def transport(c):
    """An autobahn transport dict for connection config `c`."""
    endpoint = {'type': 'tcp', 'host': '127.0.0.1', 'port': c['port']}
    tls = c.get('tls')
    if tls:
        endpoint['tls'] = tls_context(tls)
    t = {'type': c['kind'], 'endpoint': endpoint, 'max_retries': 0}
    if c['kind'] == 'websocket':
        t['url'] = 'ws{}://127.0.0.1:{}/ws'.format('s' if tls else '', c['port'])
        t['serializers'] = [c['serializer']]
    else:
        t['serializer'] = c['serializer']
    return t


def authentication(auth):
    method = auth.get('method', 'anonymous')
    if method == 'anonymous':
        return {}
    if method == 'tls':
        return {'tls': TlsAuth(auth.get('authid'))}
    keys = {'ticket': 'ticket', 'wampcra': 'secret', 'cryptosign': 'privkey'}[method]
    return {method: {'authid': auth['authid'], keys: auth[keys]}}


def component(c, realm=None, main=None, auth=None):
    # Never reconnect: on leaving, autobahn 22.7.1's asyncio RawSocket
    # transport closes before the component counts the session as done, so
    # the component takes it for a failed connection and joins again.
    return Component(transports=[transport(c)], realm=realm or c['realm'], main=main,
                     authentication=auth or authentication(c.get('auth', {})),
                     is_fatal=lambda _e: True)


def welcome(session):
    d = session._session_details
    return {'realm': d.realm, 'session': d.session, 'authid': d.authid,
            'authrole': d.authrole, 'authmethod': d.authmethod,
            'authprovider': d.authprovider, 'authextra': d.authextra,
            'serializer': session._transport._serializer.SERIALIZER_ID}


async def join(c, main=None):
    """Joins once, runs `main(session)` and leaves. Returns {welcome, result}
    or {abort: {reason, message}} or {error}."""
    out = {}

    async def run(_loop, session):
        out['welcome'] = welcome(session)
        if main:
            try:
                out['result'] = await main(session)
            except Exception as e:  # reported, not raised: autobahn would hide it
                out['main_error'] = repr(e)

    comp = component(c, main=run)
    comp.on('leave', lambda _s, d: out.setdefault(
        'leave', {'reason': d.reason, 'message': d.message}))
    comp.on('connectfailure', lambda _c, e: out.setdefault(
        'connect_failure', '{}: {}'.format(type(e).__name__, e)))
    try:
        await asyncio.wait_for(comp.start(asyncio.get_running_loop()), TIMEOUT)
    except Exception as e:
        # A refused join ends in a leave event; a session that joined ends
        # when `main` is done, however the connection then closes.
        if isinstance(e, asyncio.TimeoutError) or not ('welcome' in out or 'leave' in out):
            out['error'] = '{}: {}'.format(type(e).__name__, e)
    if 'welcome' not in out and 'leave' in out:
        out['abort'] = out.pop('leave')
    elif 'error' in out and c.get('tls'):
        out['tls_probe'] = await asyncio.to_thread(tls_probe, c)
    return out


async def until_stdin_closes(on_line=None):
    """Calls `on_line` for each line on stdin; returns at its end."""
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()
    buf = b''

    def readable():
        nonlocal buf
        data = os.read(0, 4096)
        if not data:
            loop.remove_reader(0)
            closed.set()
            return
        buf += data
        while b'\n' in buf:
            line, buf = buf.split(b'\n', 1)
            if on_line:
                on_line(line.decode().strip())

    loop.add_reader(0, readable)
    await closed.wait()


async def serve(*components):
    """Runs long-lived components until stdin closes or one of them ends."""
    loop = asyncio.get_running_loop()
    tasks = [asyncio.ensure_future(comp.start(loop)) for comp in components]
    tasks.append(asyncio.ensure_future(until_stdin_closes()))
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in done:
        if t.exception():
            emit(ended=repr(t.exception()))


# --- the Crossbar micro-services example ------------------------------------


async def auth_service(c):
    """Authenticates and authorises the applications on realm `crossbar`; logs
    to realm `logger`. The certificate (its sha1 and CN) tells instances apart,
    all of which join `crossbar` as authid `authenticator`."""
    name = c['name']
    node = component(c, realm='logger', auth={'tls': TlsAuth(name)})
    crossbar = component(c, realm='crossbar', auth={'tls': TlsAuth('authenticator')})
    joined = {}
    both = asyncio.Event()

    def log(**entry):
        if 'logger' in joined:
            joined['logger'].publish('com.example.log', dict(entry, instance=name))

    def authenticate(realm, authid, details):
        cert = details.get('transport', {}).get('client_cert') or {}
        cn = cert.get('subject', {}).get('cn', '')
        emit(authenticate={'realm': realm, 'authid': authid, 'details': details})
        log(event='authenticate', cn=cn)
        if not cn.startswith('app'):
            raise ApplicationError('com.example.unknown_client', 'no application {!r}'.format(cn))
        return {'role': 'app', 'authid': cn, 'extra': {'instance': name}}

    def authorize(session, uri, action, options):
        allow = action in ('register', 'call') and uri.startswith('com.example.app.')
        emit(authorize={'authid': session.get('authid'), 'authrole': session.get('authrole'),
                        'uri': uri, 'action': action, 'allow': allow})
        return allow

    async def on_crossbar(session, details):
        rr = RegisterOptions(invoke='roundrobin')
        await session.register(authenticate, 'com.example.authenticate', options=rr)
        await session.register(authorize, 'com.example.authorize', options=rr)
        joined['crossbar'] = welcome(session)
        if len(joined) == 2:
            both.set()

    async def on_logger(session, details):
        joined['logger'] = session
        if len(joined) == 2:
            both.set()

    crossbar.on('join', on_crossbar)
    node.on('join', on_logger)

    async def ready():
        await both.wait()
        emit(ready=name, crossbar=joined['crossbar'], logger=welcome(joined['logger']))

    asyncio.ensure_future(ready())
    await serve(crossbar, node)


async def logger(c):
    comp = component(c, realm='logger')

    async def on_join(session, details):
        async def joined(info):
            try:
                got = await session.call('wamp.session.get', info['session'])
            except ApplicationError as e:
                got = {'error': e.error}
            emit(on_join=info, get=got)

        await session.subscribe(joined, 'wamp.session.on_join')
        await session.subscribe(lambda *args: emit(on_leave=list(args)), 'wamp.session.on_leave')
        await session.subscribe(lambda entry: emit(log=entry), 'com.example.log')
        sessions = await session.call('wamp.session.list')
        emit(ready=c['name'], welcome=welcome(session), sessions=len(sessions))

    comp.on('join', on_join)
    await serve(comp)


async def app(c):
    """Joins, registers and calls com.example.app.echo, calls
    com.example.other, leaves; again, until `stop`."""
    stop = asyncio.Event()
    state = {'marked': False}

    def command(line):
        if line == 'mark':
            state['marked'] = True
        elif line == 'stop':
            stop.set()

    stdin = asyncio.ensure_future(until_stdin_closes(command))
    stdin.add_done_callback(lambda _: stop.set())

    async def use(session):
        await session.register(lambda text: text, 'com.example.app.echo')
        echo = await session.call('com.example.app.echo', 'hello')
        try:
            await session.call('com.example.other')
            other = 'allowed'
        except ApplicationError as e:
            other = e.error
        return {'echo': echo, 'other': other}

    n = 0
    while not stop.is_set():
        after_mark = state['marked']
        emit(iteration=n, after_mark=after_mark, **(await join(c, use)))
        n += 1


async def joins(c):
    async def one(label, conn):
        emit(label=label, **(await join(conn)))

    await asyncio.gather(*(one(label, conn) for label, conn in c['joins'].items()))


# --- serializers and transports ---------------------------------------------

ARGS = [b'\x00\x01\xfe\xff', bytes(range(256)), 'h\u00e9llo \u2603', 2**53 - 1, -42, 1.5,
        True, None, [], {}, {'nested': [{'deep': [1, 'two', b'3']}], 'empty': ''}]
KWARGS = {'bin': b'\xff\x00' * 8, 'list': [1, [2, [3]]], 'map': {'a': {'b': None}}}


async def matrix(c):
    """Each connection registers com.example.echo.<name> and subscribes
    com.example.matrix; then each calls every other one's echo and publishes."""
    loop = asyncio.get_running_loop()
    sessions, got, bad = {}, {}, []

    async def open(name, conn):
        joined = loop.create_future()
        comp = component(conn)
        comp.on('join', lambda s, d: joined.done() or joined.set_result(s))
        asyncio.ensure_future(comp.start(loop))
        s = await asyncio.wait_for(joined, TIMEOUT)

        def echo(*args, **kwargs):
            return CallResult(*args, served_by=name, **kwargs)

        def event(*args, **kwargs):
            sender = kwargs.pop('sender', None)
            got[name].append(sender)
            if list(args) != ARGS or kwargs != KWARGS:
                bad.append({'event_to': name, 'from': sender, 'args': args, 'kwargs': kwargs})

        got[name] = []
        await s.register(echo, 'com.example.echo.' + name)
        await s.subscribe(event, 'com.example.matrix')
        sessions[name] = s

    await asyncio.gather(*(open(n, conn) for n, conn in c['connections'].items()))

    async def call(caller, callee):
        r = await sessions[caller].call('com.example.echo.' + callee, *ARGS, **KWARGS)
        if list(r.results) != ARGS or r.kwresults != dict(KWARGS, served_by=callee):
            bad.append({'call': [caller, callee], 'results': r.results, 'kwresults': r.kwresults})
            return 0
        return 1

    pairs = [(a, b) for a in sessions for b in sessions if a != b]
    ok = sum(await asyncio.wait_for(asyncio.gather(*(call(a, b) for a, b in pairs)), TIMEOUT))

    # One large binary argument from each to the next.
    big = os.urandom(300_000)

    async def large(caller, callee):
        r = await sessions[caller].call('com.example.echo.' + callee, big)
        return r.results[0] == big

    names = list(sessions)
    large_ok = await asyncio.wait_for(asyncio.gather(
        *(large(a, b) for a, b in zip(names, names[1:] + names[:1]))), TIMEOUT)
    ack = PublishOptions(acknowledge=True)
    await asyncio.gather(*(s.publish('com.example.matrix', *ARGS, options=ack, sender=n, **KWARGS)
                           for n, s in sessions.items()))
    want = len(sessions) - 1
    for _ in range(TIMEOUT * 20):
        if all(len(g) >= want for g in got.values()):
            break
        await asyncio.sleep(0.05)
    emit(matrix={'calls': ok, 'pairs': len(pairs), 'bad': bad, 'large': large_ok,
                 'events': {n: sorted(g) for n, g in got.items()},
                 'welcome': {n: welcome(s) for n, s in sessions.items()}})


# --- the Advanced Profile -----------------------------------------------------


async def features(c):
    loop = asyncio.get_running_loop()
    peers, left = {}, {}

    async def open(name, conn):
        joined, leave = loop.create_future(), loop.create_future()
        comp = component(conn)
        comp.on('join', lambda s, d: joined.done() or joined.set_result(s))
        comp.on('leave', lambda s, d: leave.done() or leave.set_result(
            {'reason': d.reason, 'message': d.message}))
        asyncio.ensure_future(comp.start(loop))
        peers[name] = await asyncio.wait_for(joined, TIMEOUT)
        left[name] = leave

    await asyncio.gather(*(open(n, conn) for n, conn in c['connections'].items()))
    alice, bob, carol = peers['alice'], peers['bob'], peers['carol']
    ids = {n: s._session_id for n, s in peers.items()}
    emit(sessions=ids)

    async def check(name, coro):
        try:
            emit(check=name, value=await asyncio.wait_for(coro, 5))
        except Exception as e:
            emit(check=name, error='{}: {}'.format(type(e).__name__, getattr(e, 'error', e)))

    def collector(*names):
        """An event handler per name that appends (args[0], topic, publisher)."""
        got = {n: [] for n in names}

        def handler(n):
            def on(payload, details=None):
                got[n].append([payload, details.topic, details.publisher,
                               details.publisher_authid, details.publisher_authrole])
            return on
        return got, {n: handler(n) for n in names}

    async def until(cond):
        while not cond():
            await asyncio.sleep(0.01)

    details = SubscribeOptions(details=True)
    ack = PublishOptions(acknowledge=True)

    # Progressive results.
    async def progressive(n, details=None):
        for i in range(n):
            if details.progress:
                details.progress(i)
        return 'done'

    await alice.register(progressive, 'com.example.progress', options=RegisterOptions(details=True))

    async def progress():
        got = []
        result = await bob.call('com.example.progress', 3, options=CallOptions(on_progress=got.append))
        return {'progress': got, 'result': result}
    await check('progress', progress())

    # A slow procedure, cancelled and timed out.
    slow_calls = {}

    async def slow(tag):
        state = slow_calls[tag]
        state['invoked'].set()
        try:
            await asyncio.sleep(30)
            return 'finished'
        except asyncio.CancelledError:
            state['interrupted'].set_result(True)
            raise

    await alice.register(slow, 'com.example.slow')

    def expect_slow(tag):
        slow_calls[tag] = {'invoked': asyncio.Event(), 'interrupted': loop.create_future()}
        return slow_calls[tag]

    async def cancel():
        state = expect_slow('cancel')
        call = bob.call('com.example.slow', 'cancel')
        await state['invoked'].wait()
        call.cancel()
        try:
            await call
            caller = 'result'
        except asyncio.CancelledError:
            caller = 'cancelled'
        return {'caller': caller, 'callee_interrupted': await state['interrupted']}
    await check('cancel', cancel())

    async def timeout():
        state = expect_slow('timeout')
        try:
            await bob.call('com.example.slow', 'timeout', options=CallOptions(timeout=200))
            error = None
        except ApplicationError as e:
            error = e.error
        return {'error': error, 'callee_interrupted': await state['interrupted']}
    await check('timeout', timeout())

    # Pattern-based subscriptions.
    async def patterns():
        got, on = collector('prefix', 'wildcard')
        await carol.subscribe(on['prefix'], 'com.example.pfx',
                              options=SubscribeOptions(match='prefix', details=True))
        await carol.subscribe(on['wildcard'], 'com.example..status',
                              options=SubscribeOptions(match='wildcard', details=True))
        await alice.publish('com.example.pfx.a.b', 'p', options=ack)
        await alice.publish('com.example.dev1.status', 'w', options=ack)
        await alice.publish('com.example.dev1.other', 'x', options=ack)
        await until(lambda: got['prefix'] and got['wildcard'])
        return {n: [e[:2] for e in g] for n, g in got.items()}
    await check('pattern_subscriptions', patterns())

    # Pattern-based registrations.
    async def registrations():
        where = RegisterOptions(details=True)

        def procedure(details=None):
            return details.procedure
        await alice.register(procedure, 'com.example.wc..get',
                             options=RegisterOptions(match='wildcard', details=True))
        await alice.register(procedure, 'com.example.pp',
                             options=RegisterOptions(match='prefix', details=True))
        await alice.register(procedure, 'com.example.pp.exact', options=where)
        return [await bob.call(uri) for uri in
                ['com.example.wc.x.get', 'com.example.pp.deep.er', 'com.example.pp.exact']]
    await check('pattern_registrations', registrations())

    # Publisher exclusion.
    async def exclusion():
        got, on = collector('alice', 'bob')
        await alice.subscribe(on['alice'], 'com.example.self', options=details)
        await bob.subscribe(on['bob'], 'com.example.self', options=details)
        await alice.publish('com.example.self', 'first', options=ack)
        await alice.publish('com.example.self', 'second',
                            options=PublishOptions(acknowledge=True, exclude_me=False))
        await until(lambda: len(got['alice']) >= 1 and len(got['bob']) >= 2)
        return {n: [e[0] for e in g] for n, g in got.items()}
    await check('publisher_exclusion', exclusion())

    # Black and white listing.
    async def listing():
        got, on = collector('bob', 'carol')
        await bob.subscribe(on['bob'], 'com.example.bw', options=details)
        await carol.subscribe(on['carol'], 'com.example.bw', options=details)
        for payload, options in [('not-bob', {'exclude': [ids['bob']]}),
                                 ('only-bob', {'eligible_authid': ['bob']}),
                                 ('no-guests', {'exclude_authrole': ['guest']}),
                                 ('only-carol', {'eligible': [ids['carol']]}),
                                 ('not-carol', {'exclude_authid': ['carol']}),
                                 ('only-peers', {'eligible_authrole': 'peer'}),
                                 ('all', {})]:
            await alice.publish('com.example.bw', payload,
                                options=PublishOptions(acknowledge=True, **options))
        await until(lambda: all(g and g[-1][0] == 'all' for g in got.values()))
        return {n: [e[0] for e in g] for n, g in got.items()}
    await check('black_white_listing', listing())

    # Disclosure of publishers and callers (a permission with `disclose: true`).
    async def disclosure():
        got, on = collector('disclosed', 'plain')
        await bob.subscribe(on['disclosed'], 'com.example.disclosed.news', options=details)
        await bob.subscribe(on['plain'], 'com.example.news', options=details)
        await alice.publish('com.example.disclosed.news', 'd', options=ack)
        await alice.publish('com.example.news', 'p', options=ack)
        await until(lambda: got['disclosed'] and got['plain'])

        def whoami(details=None):
            return [details.caller, details.caller_authid, details.caller_authrole]
        where = RegisterOptions(details=True)
        await alice.register(whoami, 'com.example.disclosed.whoami', options=where)
        await alice.register(whoami, 'com.example.whoami', options=where)
        return {'events': {n: g[0][2:] for n, g in got.items()},
                'calls': {'disclosed': await bob.call('com.example.disclosed.whoami'),
                          'plain': await bob.call('com.example.whoami')}}
    await check('disclosure', disclosure())

    # The meta API.
    async def meta():
        reg = await alice.call('wamp.registration.lookup', 'com.example.progress')
        got = await alice.call('wamp.session.get', ids['bob'])
        try:
            await carol.call('wamp.session.count')
            guest = 'allowed'
        except ApplicationError as e:
            guest = e.error
        return {'count': await alice.call('wamp.session.count'),
                'count_guests': await alice.call('wamp.session.count', ['guest']),
                'get': {k: got.get(k) for k in ['session', 'authid', 'authrole', 'authmethod']},
                'callees': await alice.call('wamp.registration.list_callees', reg),
                'guest_count': guest}
    await check('meta', meta())

    async def unregister_unsubscribe():
        got = []
        reg = await alice.register(lambda: 'here', 'com.example.gone')
        sub = await bob.subscribe(got.append, 'com.example.gone')
        before = await bob.call('com.example.gone')
        await reg.unregister()
        await sub.unsubscribe()
        try:
            await bob.call('com.example.gone')
            after = 'answered'
        except ApplicationError as e:
            after = e.error
        await alice.publish('com.example.gone', 'lost', options=ack)
        # Bob's own call comes back after any event published before it.
        await bob.call('com.example.progress', 0)
        return {'before': before, 'after': after, 'events': got}
    await check('unregister_unsubscribe', unregister_unsubscribe())

    async def kill():
        await alice.call('wamp.session.kill', ids['carol'],
                         reason='com.example.maintenance', message='back soon')
        return {'carol_left': await left['carol'],
                'count': await alice.call('wamp.session.count')}
    await check('kill', kill())
    emit(done=True)


MODES = {'auth': auth_service, 'logger': logger, 'app': app, 'joins': joins,
         'matrix': matrix, 'features': features}

if __name__ == '__main__':
    asyncio.run(MODES[sys.argv[1]](json.loads(sys.argv[2])))

#!/usr/bin/env python3
"""Writes the hand-made seeds of fuzz/corpus/<target>/ (seed-*): well-formed
inputs of every shape each decoder reads, and the nasty inputs of issue 12
(deep nesting in both codecs, a huge Last-Event-ID, non-ASCII cursors,
malformed batch items, an unending SSE event). Run it again after changing
it; libFuzzer's own finds sit beside these under their hash names."""
import json, os, struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'corpus')

def mp(v):
    """A minimal MessagePack encoder (maps, arrays, str, int, float, bool, nil, bin)."""
    if v is None: return b'\xc0'
    if v is True: return b'\xc3'
    if v is False: return b'\xc2'
    if isinstance(v, int):
        if 0 <= v < 128: return bytes([v])
        if -32 <= v < 0: return struct.pack('b', v)
        if 0 <= v < 2**64: return b'\xcf' + struct.pack('>Q', v)
        return b'\xd3' + struct.pack('>q', v)
    if isinstance(v, float): return b'\xcb' + struct.pack('>d', v)
    if isinstance(v, bytes): return b'\xc4' + bytes([len(v)]) + v
    if isinstance(v, str):
        b = v.encode()
        if len(b) < 32: return bytes([0xa0 | len(b)]) + b
        if len(b) < 256: return b'\xd9' + bytes([len(b)]) + b
        return b'\xda' + struct.pack('>H', len(b)) + b
    if isinstance(v, list):
        h = bytes([0x90 | len(v)]) if len(v) < 16 else b'\xdc' + struct.pack('>H', len(v))
        return h + b''.join(mp(x) for x in v)
    if isinstance(v, dict):
        h = bytes([0x80 | len(v)]) if len(v) < 16 else b'\xde' + struct.pack('>H', len(v))
        return h + b''.join(mp(k) + mp(x) for k, x in v.items())
    raise TypeError(v)

def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, 'seed-' + name), 'wb') as f:
        f.write(data if isinstance(data, bytes) else data.encode())

def nested_json(n, inner='null'): return '[' * n + inner + ']' * n
def nested_mp(n): return b'\x91' * n + b'\xc0'

client = {
    'connect': {'type': 'connect', 'id': 1, 'token': 'eyJ.x.y', 'since': {'seq': 3, 'epoch': 'k3f9'}, 'resume': 'r'},
    'subscribe': {'type': 'subscribe', 'id': 2, 'channel': 'news', 'since': {'seq': 0, 'epoch': 'E1'}},
    'unsubscribe': {'type': 'unsubscribe', 'channel': 'news'},
    'publish': {'type': 'publish', 'id': 4, 'channel': 'room:1', 'data': {'text': 'hi', 'n': [1, 2.5, -3, True, None]}},
    'refresh': {'type': 'refresh', 'token': 't'},
    'ping': {'type': 'ping', 'id': 18446744073709551615},
    'pong': {'type': 'pong'},
    'unknown': {'type': 'teleport'},
    'no-type': {'channel': 'news'},
    'type-not-string': {'type': 7},
}
for k, v in client.items():
    write('frame_json', k, json.dumps(v))
    write('frame_msgpack', k, mp(v))
for n in (63, 64, 65, 200, 100000):
    pub_json = '{"type":"publish","channel":"news","data":' + nested_json(n) + '}'
    write('frame_json', f'deep-{n}', pub_json)
    write('frame_msgpack', f'deep-{n}', mp({'type': 'publish', 'channel': 'news'})[:0] + b'\x83' + mp('type') + mp('publish') + mp('channel') + mp('news') + mp('data') + nested_mp(n))
write('frame_json', 'deep-objects', '{"k":' * 300 + '1' + '}' * 300)
write('frame_json', 'brackets-in-strings', '{"type":"ping","x":"\\"' + '[' * 500 + '"}')
write('frame_msgpack', 'deep-maps', b'\x81\xa1k' * 300 + b'\x01')
write('frame_msgpack', 'huge-array-header', b'\xdd\xff\xff\xff\xff')
write('frame_msgpack', 'huge-map-header', b'\xdf\xff\xff\xff\xff\xa4type')
write('frame_msgpack', 'huge-str-header', b'\xdb\xff\xff\xff\xff')
write('frame_msgpack', 'ext-and-bin', mp({'type': 'publish', 'channel': 'c'})[:0] + b'\x83' + mp('type') + mp('publish') + mp('channel') + mp('c') + mp('data') + b'\xd4\x01\x02')
write('frame_json', 'nan', '{"type":"publish","channel":"c","data":NaN}')
write('frame_json', 'big-number', '{"type":"publish","channel":"c","data":1e400}')
write('frame_json', 'lone-surrogate', '{"type":"publish","channel":"c","data":"\\ud800"}')
# serde_json's default float parser was 1 ulp off here (float_roundtrip fixes it).
write('frame_json', 'float-roundtrip', '{"type":"publish","channel":"c","data":[6.270686590264428e121,-1.7421648512073951e75]}')
write('frame_json', 'duplicate-keys', '{"type":"publish","channel":"a","channel":"b","data":1}')

server = {
    'connected': {'type': 'connected', 'id': 1, 'client': 'c1', 'user': 'alice', 'user_channel': '$user:alice', 'expires_at': 1, 'ping_interval_ms': 25000, 'node': 'n1', 'resumed': ['news'], 'max_frame_bytes': 65536, 'max_subscriptions': 128},
    'subscribed': {'type': 'subscribed', 'id': 2, 'channel': 'news', 'epoch': 'E', 'seq': 4, 'recovered': True},
    'message': {'type': 'message', 'channel': 'news', 'seq': 42, 'epoch': 'k3f9', 'data': {'a': [1, 'x']}, 'ts': 1700000000000},
    'message-data-first': {'data': [[[1]]], 'epoch': 'k3f9', 'seq': 42, 'channel': 'news', 'type': 'message'},
    'unrecoverable': {'type': 'unrecoverable', 'channel': 'news', 'reason': 'too_old', 'epoch': 'E', 'seq': 9},
    'unrecoverable-new-reason': {'type': 'unrecoverable', 'channel': 'news', 'reason': 'cosmic_rays', 'epoch': 'E', 'seq': 9},
    'published': {'type': 'published', 'id': 3, 'channel': 'c', 'seq': 1, 'epoch': 'E'},
    'refreshed': {'type': 'refreshed', 'expires_at': 5},
    'refresh-required': {'type': 'refresh_required', 'expires_at': 5},
    'reconnect': {'type': 'reconnect', 'token': 't', 'min_delay_ms': 10, 'max_delay_ms': 5},
    'error': {'type': 'error', 'id': 9, 'code': 999, 'name': 'x', 'message': 'm', 'temporary': False},
    'token-expired': {'type': 'token_expired'},
    'message-bad-seq': {'type': 'message', 'channel': 'news', 'seq': -1, 'epoch': 'E', 'data': 1},
    'message-duplicate-keys': {'type': 'message', 'channel': 'news', 'seq': 1, 'epoch': 'E', 'data': 1},
}
for k, v in server.items():
    write('server_frame_json', k, json.dumps(v))
    write('server_frame_msgpack', k, mp(v))
for n in (64, 127, 128, 1000, 5000):
    write('server_frame_json', f'deep-message-{n}', '{"type":"message","channel":"news","seq":42,"epoch":"k3f9","data":' + nested_json(n) + '}')
    write('server_frame_msgpack', f'deep-message-{n}', b'\x85' + mp('type') + mp('message') + mp('channel') + mp('news') + mp('seq') + mp(42) + mp('epoch') + mp('k3f9') + mp('data') + nested_mp(n))
write('server_frame_json', 'duplicate-channel', '{"type":"message","channel":"a","seq":1,"epoch":"E","channel":"b","data":1}')
write('server_frame_json', 'nan-after-head', '{"type":"message","channel":"news","seq":42,"epoch":"k3f9","x":NaN}')
write('server_frame_json', 'not-an-object', 'null')

bodies = {
    'publish': {'channel': 'news', 'data': {'x': 1}},
    'send': {'user': 'alice', 'data': 'hi'},
    'batch': {'items': [{'channel': 'c', 'data': 1}, {'user': 'u', 'data': 2}]},
    'batch-malformed-items': {'items': [{'channel': 'c', 'data': 1}, {'channel': 'c'}, 7, None, {'channel': 'c', 'user': 'u', 'data': 1}, {'user': 'u', 'data': 2, 'x': 3}]},
    'unknown-field': {'channel': 'c', 'data': 1, 'extra': True},
    'batch-empty': {'items': []},
    'publish-idempotent': {'channel': 'news', 'data': 1, 'idempotency_key': 'k-1'},
    'history': {'channel': 'news', 'since': {'seq': 3, 'epoch': 'E'}, 'limit': 10, 'reverse': True},
    'info': {},
    'channels': {'pattern': 'room:*'},
    'presence': {'channel': 'room:1'},
    'disconnect': {'user': 'alice', 'reconnect': False, 'reason': 'r'},
    'server-subscribe': {'user': 'alice', 'channel': 'news', 'since': {'seq': 0, 'epoch': 'E'}},
    'server-unsubscribe': {'user': 'alice', 'channel': 'news'},
    'revoke': {'user': 'alice', 'before': 1700000000},
}
for k, v in bodies.items():
    write('api_body_json', k, json.dumps(v))
    write('api_body_msgpack', k, mp(v))
for n in (63, 64, 200, 100000):
    write('api_body_json', f'deep-{n}', '{"channel":"news","data":' + nested_json(n) + '}')
    write('api_body_msgpack', f'deep-{n}', b'\x82' + mp('channel') + mp('news') + mp('data') + nested_mp(n))
write('api_body_json', 'batch-1001', json.dumps({'items': [{'channel': 'c', 'data': i} for i in range(1001)]}))
write('api_body_msgpack', 'int-keys', b'\x82\x01\x02' + mp('data') + mp(1))
write('api_body_msgpack', 'bin-data', b'\x82' + mp('channel') + mp('c') + mp('data') + mp(b'\x00\xff'))

cursors = {
    'one': 'v1.5b8c9ab3.k3f9-42\nnews',
    'two': 'v1.00000000.k3f9-42.Z1-0\nnews\n$user:alice',
    'partial': 'v1.00000000._.E-1\nnews\nsport',
    'non-ascii': 'v1.00000000.\u00e9p\u00f6ch-1\nnews',
    'non-ascii-channel': 'v1.00000000.E-1\nn\u00e9ws',
    'plus-seq': 'v1.00000000.E-+5\nnews',
    'seq-overflow': 'v1.00000000.E-18446744073709551616\nnews',
    'empty': '\nnews',
    'spaces': '   \nnews',
    'no-channels': 'v1.811c9dc5',
    'many-parts': 'v1.00000000' + '.E-1' * 5000 + '\nnews',
}
for k, v in cursors.items():
    write('sse_cursor', k, v)
write('sse_cursor', 'huge', 'v1.00000000.' + 'A' * (1 << 20) + '-1\nnews')
write('sse_cursor', 'latin1-bytes', b'v1.00000000.\xe9-1\nnews')
write('sse_cursor', 'control-bytes', b'v1.00000000.E-1\x00\x7f\nnews')

heads = {
    'plain': 'GET /sse?channel=news HTTP/1.1\r\nHost: x\r\n\r\n',
    'cursor': 'GET /sse?channel=news&channel=sport HTTP/1.1\r\nHost: x\r\nLast-Event-ID: v1.00000000.E-1.F-2\r\n\r\n',
    'query-cursor': 'GET /sse?channel=news&last_event_id=v1.00000000.E-1 HTTP/1.1\r\nHost: x\r\n\r\n',
    'token': 'GET /sse?channel=news&token=abc HTTP/1.1\r\nAuthorization: Bearer x\r\nCookie: gateway_token=y\r\n\r\n',
    'bad-query': 'GET /sse?channel=%ZZ HTTP/1.1\r\n\r\n',
    'lf-only': 'GET /sse?channel=news HTTP/1.1\nHost: x\n\n',
    'http10': 'GET /sse?channel=news HTTP/1.0\r\n\r\n',
    'partial': 'GET /sse?channel=news HTTP/1.1\r\nHost: x\r\n',
    'too-many-headers': 'GET /sse?channel=news HTTP/1.1\r\n' + 'X: y\r\n' * 70 + '\r\n',
    'non-ascii-cursor': 'GET /sse?channel=news HTTP/1.1\r\nLast-Event-ID: v1.00000000.\u00e9-1\r\n\r\n',
}
for k, v in heads.items():
    write('sse_request_head', k, v)
write('sse_request_head', 'huge-last-event-id', 'GET /sse?channel=news HTTP/1.1\r\nLast-Event-ID: ' + 'v' * (64 << 10) + '\r\n\r\n')
write('sse_request_head', 'latin1-header', b'GET /sse?channel=news HTTP/1.1\r\nLast-Event-ID: \xe9\r\n\r\n')
write('sse_request_head', 'nul-in-target', b'GET /sse?channel=n\x00ews HTTP/1.1\r\n\r\n')

ok = 'HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n'
ev = ('retry: 2000\n\nevent: connected\nid: v1.00000000.E-1\ndata: {"type":"connected","client":"c","user":"","ping_interval_ms":25000,"node":"n"}\n\n'
      'id: v1.00000000.E-2\ndata: {"type":"message","channel":"news","seq":2,"epoch":"E","data":1}\n\n: keep-alive\n\n'
      'event: unrecoverable\ndata: {"type":"unrecoverable","channel":"news","reason":"too_old","epoch":"E","seq":9}\n\n'
      'event: reconnect\ndata: {"type":"reconnect","token":"t","min_delay_ms":1,"max_delay_ms":2}\n\n')
def chunked(body, size=17):
    out = ''
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += '%x\r\n%s\r\n' % (len(part.encode()), part)
    return out + '0\r\n\r\n'
write('sdk_sse_stream', 'until-eof', ok + '\r\n' + ev)
write('sdk_sse_stream', 'chunked', ok + 'transfer-encoding: chunked\r\n\r\n' + chunked(ev))
write('sdk_sse_stream', 'length', ok + 'content-length: %d\r\n\r\n' % len(ev) + ev + 'trailing')
write('sdk_sse_stream', 'crlf-and-cr', ok + '\r\n' + ev.replace('\n', '\r\n') + ev.replace('\n', '\r'))
write('sdk_sse_stream', 'refused', 'HTTP/1.1 503 Service Unavailable\r\nretry-after: 3\r\ncontent-length: 2\r\n\r\n{}')
write('sdk_sse_stream', 'unending-event', ok + '\r\n' + 'data: ' + 'x' * 4000 + '\n' + 'data: y\n' * 500)
write('sdk_sse_stream', 'unending-line', ok + '\r\n' + 'data: ' + 'x' * 20000)
write('sdk_sse_stream', 'bad-chunk', ok + 'transfer-encoding: chunked\r\n\r\nzz\r\n')
write('sdk_sse_stream', 'huge-chunk', ok + 'transfer-encoding: chunked\r\n\r\nffffffffffffffff\r\nabc')
write('sdk_sse_stream', 'non-utf8-head', b'HTTP/1.1 200 \xff\r\n\r\n')
write('sdk_sse_stream', 'deep-message', ok + '\r\ndata: {"type":"message","channel":"news","seq":1,"epoch":"E","data":' + nested_json(3000) + '}\n\n')

#!/usr/bin/env python3
"""Writes the seed corpora of the tapmirror fuzz targets (seeds/nbd_server, seeds/nbd_proto).

The bytes are built here from the protocol document (NetworkBlockDevice/nbd doc/proto.md), not
with tapmirror's own encoders, so the seeds are an independent picture of the wire format.
Deterministic: running it again rewrites identical files. Usage: python3 gen_seeds.py
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Options.
EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO = 1, 2, 3, 5, 6, 7
STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT, EXTENDED_HEADERS = 8, 9, 10, 11
# Commands.
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = 0, 1, 2, 3, 4, 5, 6, 7
# Command flags.
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
# Info types.
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

IMAGE_SIZE = 1 << 20  # the nbd_server target's image
EXPORT = b"fuzz"  # the nbd_server target's export name


def u16(v):
    return struct.pack(">H", v)


def u32(v):
    return struct.pack(">I", v)


def u64(v):
    return struct.pack(">Q", v)


def string32(s):
    return u32(len(s)) + s


def option(opt, data=b""):
    return u64(IHAVEOPT) + u32(opt) + u32(len(data)) + data


def info_request(name=b"", infos=()):
    return string32(name) + u16(len(infos)) + b"".join(u16(i) for i in infos)


def meta_request(export=b"", queries=()):
    return string32(export) + u32(len(queries)) + b"".join(string32(q) for q in queries)


def request(kind, offset=0, length=0, flags=0, cookie=None, payload=b""):
    request.cookie += 1
    c = request.cookie if cookie is None else cookie
    return u32(REQUEST_MAGIC) + u16(flags) + u16(kind) + u64(c) + u64(offset) + u32(length) + payload


request.cookie = 0


def pattern(n, seed):
    return bytes((seed + 7 * i) & 0xFF for i in range(n))


def structured_handshake(name=b""):
    return (
        u32(3)  # FIXED_NEWSTYLE | NO_ZEROES
        + option(STRUCTURED_REPLY)
        + option(SET_META_CONTEXT, meta_request(name, [b"base:allocation"]))
        + option(GO, info_request(name))
    )


def server_seeds():
    s = {}
    # The brief's reference session: structured replies, base:allocation, every command.
    s["structured_all_commands"] = structured_handshake() + b"".join(
        [
            request(READ, 0, 4096),
            request(WRITE, 4096, 512, payload=pattern(512, 1)),
            request(BLOCK_STATUS, 0, IMAGE_SIZE),
            request(WRITE_ZEROES, 8192, 4096),
            request(TRIM, 65536, 65536),
            request(FLUSH),
            request(DISC),
        ]
    )
    # Structured, named export, the flags each command allows, a read long enough to be
    # split into data and hole chunks, block status with REQ_ONE.
    s["structured_flags"] = structured_handshake(EXPORT) + b"".join(
        [
            request(WRITE, 0, 256, FUA, payload=pattern(256, 2)),
            request(READ, 0, 128 * 1024),
            request(READ, 0, 128 * 1024, DF),
            request(READ, IMAGE_SIZE - 512, 512, FUA),
            request(BLOCK_STATUS, 0, 8192, REQ_ONE),
            request(WRITE_ZEROES, 0, 4096, NO_HOLE | FUA),
            request(WRITE_ZEROES, 4096, 4096, FAST_ZERO),
            request(TRIM, 0, 4096, FUA),
            request(FLUSH, flags=FUA),
            request(DISC),
        ]
    )
    # Simple replies: old-style client flags (zeroes wanted), GO asking for every info item.
    s["simple_go_infos"] = (
        u32(1)
        + option(GO, info_request(EXPORT, [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]))
        + request(READ, 512, 1024)
        + request(WRITE, 1024, 64, FUA, payload=pattern(64, 3))
        + request(WRITE_ZEROES, 0, 512)
        + request(FLUSH)
        + request(DISC)
    )
    # NBD_OPT_EXPORT_NAME enters transmission without a reply header; no DISC at the end
    # (a clean close between requests).
    s["export_name"] = (
        u32(3) + option(EXPORT_NAME, EXPORT) + request(READ, 0, 512) + request(WRITE, 0, 16, payload=pattern(16, 4))
    )
    # Negotiation only: every option, some in the wrong order or with bad data, then ABORT.
    s["negotiation_tour"] = (
        u32(3)
        + option(LIST)
        + option(LIST, b"x")
        + option(INFO, info_request(EXPORT, [INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]))
        + option(INFO, info_request(b"nope"))
        + option(INFO, b"\x00\x00")
        + option(LIST_META_CONTEXT, meta_request())
        + option(STRUCTURED_REPLY, b"x")
        + option(STRUCTURED_REPLY)
        + option(STRUCTURED_REPLY)
        + option(LIST_META_CONTEXT, meta_request())
        + option(LIST_META_CONTEXT, meta_request(EXPORT, [b"base:"]))
        + option(SET_META_CONTEXT, meta_request(b"", [b"qemu:dirty-bitmap:x", b"base:allocation"]))
        + option(SET_META_CONTEXT, meta_request(b"nope", [b"base:allocation"]))
        + option(SET_META_CONTEXT, u32(0) + u32(0xFFFFFFFF))
        + option(STARTTLS)
        + option(EXTENDED_HEADERS)
        + option(42, b"unknown")
        + option(ABORT)
    )
    # Requests the server must refuse with an error reply and carry on after.
    s["refused_requests"] = (
        u32(3)
        + option(STRUCTURED_REPLY)
        + option(GO, info_request())
        + b"".join(
            [
                request(READ, IMAGE_SIZE, 1),
                request(READ, 0xFFFFFFFFFFFFFFFF, 2),
                request(READ, 0, (32 << 20) + 1),
                request(WRITE, IMAGE_SIZE - 8, 16, payload=pattern(16, 5)),
                request(WRITE, 0, 8, NO_HOLE, payload=pattern(8, 6)),
                request(CACHE, 0, 512),
                request(99, 0, 512),
                request(READ, 0, 512, 1 << 9),
                request(BLOCK_STATUS, 0, 512),  # no meta context selected
                request(WRITE_ZEROES, IMAGE_SIZE, 512),
                request(TRIM, IMAGE_SIZE, 512),
                request(READ, 0, 512),
                request(DISC),
            ]
        )
    )
    # Plain session that then breaks the stream with a bad request magic.
    s["bad_magic_mid_stream"] = (
        u32(3) + option(GO, info_request()) + request(READ, 0, 512) + b"\xde\xad\xbe\xef" + bytes(24)
    )
    # A WRITE whose payload is cut short by the end of the stream.
    s["truncated_write"] = u32(3) + option(GO, info_request()) + request(WRITE, 0, 4096) + pattern(100, 7)
    # Negotiation failures: unknown client flags, no fixed newstyle, bad option magic,
    # unknown export through EXPORT_NAME.
    s["bad_client_flags"] = u32(4)
    s["no_fixed_newstyle"] = u32(0)
    s["bad_option_magic"] = u32(3) + b"NOTMAGIC" + u32(GO) + u32(0)
    s["export_name_unknown"] = u32(3) + option(EXPORT_NAME, b"nope")
    return s


def proto_seeds():
    s = {}
    s["request"] = request(WRITE, 4096, 512, FUA, cookie=0x0102030405060708)
    s["simple_reply"] = u32(SIMPLE_REPLY_MAGIC) + u32(22) + u64(7)
    s["chunk_header"] = u32(STRUCTURED_REPLY_MAGIC) + u16(1) + u16(5) + u64(7) + u32(12)
    s["option_go"] = option(GO, info_request(EXPORT, [INFO_BLOCK_SIZE]))
    s["option_reply"] = u64(OPTION_REPLY_MAGIC) + u32(GO) + u32(3) + u32(12) + u16(INFO_EXPORT) + u64(IMAGE_SIZE) + u16(0x1ED)
    s["info_request"] = info_request(EXPORT, [INFO_NAME, INFO_BLOCK_SIZE])
    s["meta_context_request"] = meta_request(EXPORT, [b"base:allocation", b"base:"])
    s["block_status"] = u32(1) + u32(4096) + u32(0) + u32(61440) + u32(3)
    s["error_payload"] = u32(28) + string16(b"no space left")
    s["info_export"] = u16(INFO_EXPORT) + u64(IMAGE_SIZE) + u16(0x1ED)
    s["info_block_size"] = u16(INFO_BLOCK_SIZE) + u32(1) + u32(4096) + u32(32 << 20)
    s["info_name"] = u16(INFO_NAME) + EXPORT
    s["meta_context_reply"] = u32(1) + b"base:allocation"
    s["server_reply"] = string32(EXPORT)
    return s


def string16(s):
    return u16(len(s)) + s


def write(dirname, seeds):
    path = os.path.join(HERE, "seeds", dirname)
    os.makedirs(path, exist_ok=True)
    for name, data in sorted(seeds.items()):
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    print(f"{path}: {len(seeds)} seeds, {sum(len(d) for d in seeds.values())} bytes")


if __name__ == "__main__":
    write("nbd_server", server_seeds())
    write("nbd_proto", proto_seeds())

#!/usr/bin/env python3
"""Writes the seed corpora of the tapmirror fuzz targets (seeds/nbd_server, seeds/nbd_proto,
seeds/vhd_parse).

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


# --- VHD files (Microsoft VHD specification 1.0), built field by field. -----------------------

VHD_EPOCH_STAMP = 0x2A000000  # a fixed timestamp, so the seeds are deterministic


def vhd_checksum(b, field):
    total = sum(x for i, x in enumerate(b) if not field <= i < field + 4)
    return (~total) & 0xFFFFFFFF


def vhd_footer(size, disk_type, creator=b"tap\0", uuid=b"\x11" * 16, geometry=None):
    if geometry is None:
        geometry = (min(size // 512 // (16 * 63), 65535), 16, 63)
    c, h, s = geometry
    b = bytearray(512)
    b[0:8] = b"conectix"
    b[8:12] = u32(2)
    b[12:16] = u32(0x00010000)
    b[16:24] = u64(512)
    b[24:28] = u32(VHD_EPOCH_STAMP)
    b[28:32] = creator
    b[32:36] = u32(0x00010001)
    b[40:48] = u64(size)
    b[48:56] = u64(size)
    b[56:60] = u16(c) + bytes([h, s])
    b[60:64] = u32(disk_type)
    b[68:84] = uuid
    b[64:68] = u32(vhd_checksum(b, 64))
    return bytes(b)


def vhd_header(entries, block_size, parent_uuid=b"\0" * 16, parent_name="", locators=()):
    b = bytearray(1024)
    b[0:8] = b"cxsparse"
    b[8:16] = u64(0xFFFFFFFFFFFFFFFF)
    b[16:24] = u64(1536)
    b[24:28] = u32(0x00010000)
    b[28:32] = u32(entries)
    b[32:36] = u32(block_size)
    b[40:56] = parent_uuid
    name = parent_name.encode("utf-16-be")
    b[64 : 64 + len(name)] = name
    for i, (code, space, length, offset) in enumerate(locators):
        at = 576 + 24 * i
        b[at : at + 24] = u32(code) + u32(space) + u32(length) + u32(0) + u64(offset)
    b[36:40] = u32(vhd_checksum(b, 36))
    return bytes(b)


def vhd_file(size, block_size, blocks, disk_type=3, creator=b"tap\0", uuid=b"\x11" * 16, geometry=None,
             parent=None):
    """A sparse disk: `blocks` maps a block number to (bitmap bytes, data byte)."""
    entries = (size + block_size - 1) // block_size
    bat_len = (entries * 4 + 511) // 512 * 512
    bitmap_len = ((block_size // 512 + 7) // 8 + 511) // 512 * 512
    footer = vhd_footer(size, disk_type, creator, uuid, geometry)
    locators, loc_data = [], b""
    start = 1536 + bat_len
    if parent is not None:
        parent_uuid, parent_name = parent
        rel = (".\\" + parent_name).encode("utf-16-le")
        space = (len(rel) + 511) // 512 * 512
        locators = [(0x57327275, space, len(rel), start)]  # W2ru
        loc_data = rel + b"\0" * (space - len(rel))
    bat = [0xFFFFFFFF] * entries
    body = b""
    pos = start + len(loc_data)
    for n, (bitmap, byte) in sorted(blocks.items()):
        bat[n] = pos // 512
        body += bitmap + b"\0" * (bitmap_len - len(bitmap)) + bytes([byte]) * block_size
        pos += bitmap_len + block_size
    bat_bytes = b"".join(u32(e) for e in bat)
    bat_bytes += b"\xff" * (bat_len - len(bat_bytes))
    if parent is None:
        header = vhd_header(entries, block_size)
    else:
        header = vhd_header(entries, block_size, parent[0], parent[1], locators)
    return footer + header + bat_bytes + loc_data + body + footer


def vhd_seeds():
    s = {}
    s["dynamic_empty"] = vhd_file(1 << 20, 65536, {})
    s["dynamic_two_blocks"] = vhd_file(64 << 10, 4096, {0: (b"\xff", 0xAB), 3: (b"\x0f", 0xCD)})
    s["dynamic_tiny_blocks"] = vhd_file(16 << 10, 512, {1: (b"\x80", 0x42), 15: (b"\x80", 0x43)})
    s["dynamic_2mib_block_empty"] = vhd_file(4 << 20, 2 << 20, {})
    s["qemu_chs_size"] = vhd_file(10 << 20, 1 << 20, {}, creator=b"qemu", geometry=(301, 4, 17))
    s["differencing_missing_parent"] = vhd_file(64 << 10, 4096, {0: (b"\x3c", 0x99)}, disk_type=4,
                                                uuid=b"\x22" * 16, parent=(b"\x11" * 16, "parent.vhd"))
    return s


def qcow2_seeds():
    """Made by qemu-img and qemu-io (the peer whose files the driver must read), in a scratch
    folder beside the backings the qcow2_parse target provides. Skipped without qemu-img."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        print("qemu-img or qemu-io missing: qcow2_parse seeds not written")
        return None
    s = {}
    with tempfile.TemporaryDirectory() as d:
        # Stand-ins for the target's backings, which qemu-io opens for the overlays' writes.
        with open(os.path.join(d, "base.raw"), "wb") as f:
            f.truncate(1 << 20)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512",
                        os.path.join(d, "base.qcow2"), "1M"], check=True)

        def img(name, opts, size="1M", writes=(), backing=None, convert_compressed=False):
            path = os.path.join(d, name)
            cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
            if backing is not None:
                cmd += ["-u", "-b", backing[0], "-F", backing[1]]
            subprocess.run(cmd + [path, size], check=True)
            for w in writes:
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", w, path], check=True, stdout=subprocess.DEVNULL)
            if convert_compressed:
                out = path + ".c"
                subprocess.run(["qemu-img", "convert", "-q", "-c", "-O", "qcow2", "-o", opts, path, out], check=True)
                path = out
            with open(path, "rb") as f:
                s[name] = f.read()

        data = ("write -P 0xab 0 4k", "write -P 0xcd 300k 1k", "write -z 512k 64k")
        s_opts = "cluster_size=512"
        img("v3_512_empty", s_opts)
        img("v3_512_data", s_opts, writes=data)
        img("v2_4k_data", "compat=0.10,cluster_size=4096", writes=data)
        img("v3_4k_refcount1", "cluster_size=4096,refcount_bits=1", writes=data)
        img("v3_4k_refcount64", "cluster_size=4096,refcount_bits=64", writes=data)
        img("v3_64k_data", "cluster_size=65536", writes=("write -P 0x11 0 64k",))
        img("v3_4k_compressed", "cluster_size=4096", writes=("write -P 0x22 0 16k",), convert_compressed=True)
        img("overlay_on_raw", s_opts, writes=("write -P 0x33 4k 1k",), backing=("base.raw", "raw"))
        img("overlay_on_qcow2", s_opts, writes=("write -P 0x44 8k 512",), backing=("base.qcow2", "qcow2"))
        img("overlay_missing_backing", s_opts, backing=("missing.qcow2", "qcow2"))
        # Damaged as `qemu-img check` reports "refcount=1 reference=2": guest cluster 0 mapped
        # (with COPIED) onto the active L1 table, which the driver's guard must keep writes off.
        img("v3_4k_data_onto_l1", "cluster_size=4096", writes=("write -P 0xaa 0 4k", "write -P 0xbb 64k 4k"))
        b = bytearray(s["v3_4k_data_onto_l1"])
        l1 = int.from_bytes(b[40:48], "big")
        l2 = int.from_bytes(b[l1:l1 + 8], "big") & 0x00FFFFFFFFFFFE00
        b[l2:l2 + 8] = ((1 << 63) | l1).to_bytes(8, "big")
        s["v3_4k_data_onto_l1"] = bytes(b)
    return s


if __name__ == "__main__":
    write("nbd_server", server_seeds())
    write("nbd_proto", proto_seeds())
    write("vhd_parse", vhd_seeds())
    qcow2 = qcow2_seeds()
    if qcow2 is not None:
        write("qcow2_parse", qcow2)

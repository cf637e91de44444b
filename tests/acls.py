"""POSIX ACLs as the kernel stores them in extended attributes."""

from __future__ import annotations


def default_acl(user: int, group: int, other: int) -> bytes:
    """``d:u::<user>,d:g::<group>,d:o::<other>`` in the kernel's xattr format
    (version 2, then entries of tag, permissions and id), for the
    ``system.posix_acl_default`` attribute of a directory."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, user), (0x04, group), (0x20, other)]
    body = b"".join(
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + undefined.to_bytes(4, "little")
        for tag, perm in entries
    )
    return (2).to_bytes(4, "little") + body

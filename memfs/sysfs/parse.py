"""The kernel's sysfs string parsers, reproduced exactly.

Everything here works on ``bytes`` the way the C code works on ``char *``:
a buffer ends at its first NUL, nothing is decoded, and the only exception a
parser raises is ``OSError`` with ``errno.EINVAL`` or ``errno.ERANGE`` (the
negative errno the kernel function would return).

Sources:

* ``sysfs_streq`` / ``__sysfs_match_string``: lib/string.c
* ``kstrtobool``, ``kstrtoull``, ``kstrtoll``, ``kstrtouint``, ``kstrtoint``:
  lib/kstrtox.c (``_parse_integer_fixup_radix``, ``_parse_integer_limit``)
* ``kernfs_buf``: fs/kernfs/file.c ``kernfs_fop_write_iter`` (a write is cut
  to PAGE_SIZE bytes and copied into a NUL-terminated buffer) and
  fs/sysfs/file.c ``sysfs_kf_write`` (a zero-length write never reaches the
  store method).
"""
from __future__ import annotations

import enum
import errno
import re
from typing import Optional, Sequence, Union

__all__ = [
    "PAGE_SIZE",
    "U64_MAX",
    "U32_MAX",
    "S64_MAX",
    "S64_MIN",
    "S32_MAX",
    "S32_MIN",
    "KstrtoboolAlphabet",
    "KSTRTOBOOL_BASIC",
    "KSTRTOBOOL_TF",
    "KSTRTOBOOL_ED",
    "KSTRTOBOOL_TF_SINCE",
    "KSTRTOBOOL_ED_SINCE",
    "kstrtobool_alphabet_for",
    "kernfs_buf",
    "sysfs_streq",
    "sysfs_match_string",
    "kstrtobool",
    "kstrtoull",
    "kstrtoll",
    "kstrtouint",
    "kstrtoint",
]

PAGE_SIZE = 4096

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
S64_MAX = (1 << 63) - 1
S64_MIN = -(1 << 63)
S32_MAX = (1 << 31) - 1
S32_MIN = -(1 << 31)

Buf = Union[bytes, bytearray, memoryview, str]


def _einval() -> OSError:
    return OSError(errno.EINVAL, "Invalid argument")


def _erange() -> OSError:
    return OSError(errno.ERANGE, "Numerical result out of range")


def _cstr(buf: Buf) -> bytes:
    """The C-string view of ``buf``: bytes up to (not including) the first NUL.

    ``str`` is encoded as UTF-8 (lone surrogates via surrogateescape, so any
    ``str`` produced from arbitrary bytes round-trips)."""
    if isinstance(buf, str):
        b = buf.encode("utf-8", "surrogateescape")
    elif isinstance(buf, (bytes, bytearray, memoryview)):
        b = bytes(buf)
    else:
        raise TypeError(f"expected bytes or str, got {type(buf).__name__}")
    nul = b.find(b"\0")
    return b if nul < 0 else b[:nul]


# --------------------------------------------------------------------------
# kernfs write buffer
# --------------------------------------------------------------------------

def kernfs_buf(data: Buf) -> bytes:
    """What a sysfs store method sees of one write(2) of ``data``.

    kernfs copies at most PAGE_SIZE (4096) bytes of the write (longer writes are
    silently cut, no E2BIG) into a buffer with a NUL appended, so the string
    functions the stores use stop at the first embedded NUL.  Returns those
    bytes (possibly empty).

    Note: the caller decides what an *empty write* means; a zero-length write(2)
    never reaches the store method (returns 0, no effect), whereas a write whose
    first byte is NUL does reach it and is seen as an empty string.  The kernel
    passes the store the full byte count (up to 4096) and a successful store
    returns it, so the FUSE layer should report ``min(len(data), 4096)``.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return _cstr(bytes(data[:PAGE_SIZE]))


# --------------------------------------------------------------------------
# sysfs_streq / sysfs_match_string  (lib/string.c)
# --------------------------------------------------------------------------

def sysfs_streq(buf: Buf, s: Buf) -> bool:
    """lib/string.c ``sysfs_streq(s1, s2)``.

    Exact, case-sensitive comparison of the two C strings, except that one of
    them may carry exactly one extra trailing ``"\\n"``.  (Both carrying one
    ``"\\n"`` is simply equal.)  ``"online\\n"`` == ``online``;
    ``"online\\n\\n"``, ``" online"``, ``"Online"`` do not match."""
    a = _cstr(buf)
    b = _cstr(s)
    if a == b:
        return True
    if a == b + b"\n":
        return True
    if b == a + b"\n":
        return True
    return False


def sysfs_match_string(options: Sequence[Optional[str]], buf: Buf) -> int:
    """``__sysfs_match_string(array, n, str)``: index of the first option that
    ``sysfs_streq``-matches ``buf``, or -1 (the kernel returns -EINVAL).

    As in the kernel, a ``None`` entry ends the array early."""
    for index, item in enumerate(options):
        if item is None:
            break
        if sysfs_streq(item, buf):
            return index
    return -1


# --------------------------------------------------------------------------
# kstrtobool  (lib/kstrtox.c)
# --------------------------------------------------------------------------

class KstrtoboolAlphabet(str, enum.Enum):
    """Which first characters ``kstrtobool`` accepts.

    The values name a kernel tree whose lib/kstrtox.c has the alphabet (5.12,
    6.6, 6.19); the releases that added each are ``KSTRTOBOOL_TF_SINCE`` and
    ``KSTRTOBOOL_ED_SINCE``.  See ``kstrtobool_alphabet_for`` for the mapping from
    a kernel version.
    """

    #: ``y Y 1`` true, ``n N 0`` false, ``o``/``O`` + ``n``/``N`` true,
    #: ``o``/``O`` + ``f``/``F`` false (5.12-5.14 trees)
    BASIC = "5.12"
    #: BASIC plus ``t T`` true and ``f F`` false (present in the 6.6 tree)
    TF = "6.6"
    #: TF plus ``e E`` true and ``d D`` false (present in the 6.19 tree)
    ED = "6.19"


KSTRTOBOOL_BASIC = KstrtoboolAlphabet.BASIC
KSTRTOBOOL_TF = KstrtoboolAlphabet.TF
KSTRTOBOOL_ED = KstrtoboolAlphabet.ED

#: first kernel version with ``t/T/f/F``: absent from the 5.14 tree's lib/kstrtox.c,
#: present in 6.6's.  The patch "lib/kstrtox.c: Add "false"/"true" support
#: to kstrtobool()" (Jagdish Gediya, v2 posted 2022-04-26 for the mm tree) puts it
#: in 5.19 (approx., from the mailing list).  So the 6.1 kernel of the reference
#: traces has it.  memfs.machine.profiles agrees (6.1 -> "tf").
KSTRTOBOOL_TF_SINCE = (5, 19)
#: first kernel version with ``e/E/d/D`` (commit ae5b3500856f "kstrtox: add support
#: for enabled and disabled in kstrtobool()"), in the 6.19 tree.
KSTRTOBOOL_ED_SINCE = (6, 19)

# the names memfs.machine.profiles uses for the same alphabets
_ALIASES = {"basic": KSTRTOBOOL_BASIC, "tf": KSTRTOBOOL_TF, "ed": KSTRTOBOOL_ED}

_TRUE = {
    KSTRTOBOOL_BASIC: frozenset(b"yY1"),
    KSTRTOBOOL_TF: frozenset(b"yY1tT"),
    KSTRTOBOOL_ED: frozenset(b"yY1tTeE"),
}
_FALSE = {
    KSTRTOBOOL_BASIC: frozenset(b"nN0"),
    KSTRTOBOOL_TF: frozenset(b"nN0fF"),
    KSTRTOBOOL_ED: frozenset(b"nN0fFdD"),
}

_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)")


def kstrtobool_alphabet_for(version: Union[str, KstrtoboolAlphabet]) -> KstrtoboolAlphabet:
    """Map an alphabet to itself.  Accepted forms: a ``KSTRTOBOOL_*`` constant;
    its value ("5.12", "6.6", "6.19"); the names memfs.machine.profiles uses
    ("basic", "tf", "ed"); or a kernel version / profile name such as "5.13",
    "6.1", "6.8+" or "7.0-vendor".  A version maps to BASIC below 5.19, to TF
    from 5.19 to 6.18 and to ED from 6.19 (``KSTRTOBOOL_*_SINCE``).

    Raises ValueError for anything else."""
    if isinstance(version, KstrtoboolAlphabet):
        return version
    try:
        return KstrtoboolAlphabet(version)
    except ValueError:
        pass
    alias = _ALIASES.get(str(version).strip().lower())
    if alias is not None:
        return alias
    m = _VERSION_RE.match(str(version))
    if not m:
        raise ValueError(f"not a kernel version or kstrtobool alphabet: {version!r}")
    v = (int(m.group(1)), int(m.group(2)))
    if v >= KSTRTOBOOL_ED_SINCE:
        return KSTRTOBOOL_ED
    if v >= KSTRTOBOOL_TF_SINCE:
        return KSTRTOBOOL_TF
    return KSTRTOBOOL_BASIC


def kstrtobool(buf: Buf, profile_alphabet: Union[str, KstrtoboolAlphabet]) -> bool:
    """lib/kstrtox.c ``kstrtobool``: only the first one or two characters matter.

    ``profile_alphabet`` is one of the ``KSTRTOBOOL_*`` constants, or any other
    form ``kstrtobool_alphabet_for`` accepts (a profile name such as "6.1", or
    "basic"/"tf"/"ed").  Raises
    ``OSError(EINVAL)`` when the string is not a boolean (including empty,
    ``"\\n"`` and a lone ``"o"``)."""
    alphabet = kstrtobool_alphabet_for(profile_alphabet)
    s = _cstr(buf)
    if not s:
        raise _einval()
    c = s[0]
    if c in _TRUE[alphabet]:
        return True
    if c in _FALSE[alphabet]:
        return False
    if c in b"oO":
        c1 = s[1] if len(s) > 1 else 0
        if c1 in b"nN":
            return True
        if c1 in b"fF":
            return False
    raise _einval()


# --------------------------------------------------------------------------
# kstrto[u]ll / kstrto[u]int  (lib/kstrtox.c)
# --------------------------------------------------------------------------

_HEXDIGITS = b"0123456789abcdefABCDEF"


def _fixup_radix(s: bytes, base: int) -> tuple[bytes, int]:
    """``_parse_integer_fixup_radix``."""
    if base == 0:
        if s[:1] == b"0":
            if s[1:2] in (b"x", b"X") and s[2:3] != b"" and s[2:3] in _HEXDIGITS:
                base = 16
            else:
                base = 8
        else:
            base = 10
    if base == 16 and s[:1] == b"0" and s[1:2] in (b"x", b"X"):
        s = s[2:]
    return s, base


def _parse_integer(s: bytes, base: int) -> tuple[int, int, bool]:
    """``_parse_integer_limit``: returns (value, digits consumed, overflowed).

    Digits keep being consumed after an overflow; the caller reports ERANGE
    before looking at what follows them."""
    res = 0
    n = 0
    overflow = False
    for c in s:
        if 0x30 <= c <= 0x39:
            val = c - 0x30
        else:
            lc = c | 0x20
            if 0x61 <= lc <= 0x66:
                val = lc - 0x61 + 10
            else:
                break
        if val >= base:
            break
        res = res * base + val
        if res > U64_MAX:
            overflow = True
            res &= U64_MAX
        n += 1
    return res, n, overflow


def _kstrtoull(s: bytes, base: int) -> int:
    if base != 0 and not 2 <= base <= 16:
        raise ValueError(f"unsupported base {base}")
    s, base = _fixup_radix(s, base)
    value, n, overflow = _parse_integer(s, base)
    if overflow:
        raise _erange()
    if n == 0:
        raise _einval()
    rest = s[n:]
    if rest[:1] == b"\n":
        rest = rest[1:]
    if rest:
        raise _einval()
    return value


def kstrtoull(buf: Buf, base: int = 0) -> int:
    """lib/kstrtox.c ``kstrtoull``.

    Optional single leading ``+``; with base 0: ``0x``/``0X`` followed by a hex
    digit selects hex, a leading ``0`` octal, otherwise decimal; one trailing
    ``"\\n"``; anything else EINVAL; a value above 2**64-1 ERANGE (even if junk
    follows the digits).  No whitespace, no ``-``."""
    s = _cstr(buf)
    if s[:1] == b"+":
        s = s[1:]
    return _kstrtoull(s, base)


def kstrtoll(buf: Buf, base: int = 0) -> int:
    """lib/kstrtox.c ``kstrtoll``: ``-`` or ``+`` (not both), then as kstrtoull;
    outside [-2**63, 2**63-1] ERANGE."""
    s = _cstr(buf)
    if s[:1] == b"-":
        tmp = _kstrtoull(s[1:], base)
        if tmp > (1 << 63):
            raise _erange()
        return -tmp
    tmp = kstrtoull(s, base)
    if tmp > S64_MAX:
        raise _erange()
    return tmp


def kstrtouint(buf: Buf, base: int = 0) -> int:
    """lib/kstrtox.c ``kstrtouint`` (used by ``param_set_uint``, e.g.
    ``auto_movable_ratio``): kstrtoull, then ERANGE above 2**32-1.  A leading
    ``-`` is EINVAL (so ``-1`` is EINVAL, as the trace shows)."""
    tmp = kstrtoull(buf, base)
    if tmp > U32_MAX:
        raise _erange()
    return tmp


def kstrtoint(buf: Buf, base: int = 0) -> int:
    """lib/kstrtox.c ``kstrtoint`` (used by ``param_set_int``): kstrtoll, then
    ERANGE outside [-2**31, 2**31-1]."""
    tmp = kstrtoll(buf, base)
    if not (S32_MIN <= tmp <= S32_MAX):
        raise _erange()
    return tmp


def bitmap_list(ids) -> str:
    """The kernel's "%*pbl" list format: [0, 2, 3, 4] -> "0,2-4" ("" when empty)."""
    out: list[str] = []
    ids = sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)

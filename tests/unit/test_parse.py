"""Unit tests for memfs.sysfs.parse: the kernel's sysfs string parsers.

Every rule of lib/string.c (sysfs_streq, __sysfs_match_string) and
lib/kstrtox.c (kstrtobool, kstrto*int) has a case here, plus the write results recorded in the
reference traces (e.g. `-1` > auto_movable_ratio is EINVAL).
"""
import errno

import pytest
from hypothesis import given, settings, strategies as st

from memfs.sysfs.parse import (
    KSTRTOBOOL_BASIC,
    KSTRTOBOOL_ED,
    KSTRTOBOOL_TF,
    PAGE_SIZE,
    S32_MAX,
    S32_MIN,
    S64_MAX,
    S64_MIN,
    U32_MAX,
    U64_MAX,
    KstrtoboolAlphabet,
    kernfs_buf,
    kstrtobool,
    kstrtobool_alphabet_for,
    kstrtoint,
    kstrtoll,
    kstrtouint,
    kstrtoull,
    sysfs_match_string,
    sysfs_streq,
)

ALPHABETS = [KSTRTOBOOL_BASIC, KSTRTOBOOL_TF, KSTRTOBOOL_ED]
ONLINE_TYPES = ["offline", "online", "online_kernel", "online_movable"]


def errno_of(fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert type(ei.value) is OSError
    return ei.value.errno


# ---------------------------------------------------------------- kernfs_buf

class TestKernfsBuf:
    def test_plain(self):
        assert kernfs_buf(b"online\n") == b"online\n"

    def test_empty(self):
        assert kernfs_buf(b"") == b""

    def test_cut_at_first_nul(self):
        assert kernfs_buf(b"online\0garbage") == b"online"
        assert kernfs_buf(b"\0online") == b""
        assert kernfs_buf(b"on\0\0line") == b"on"

    def test_truncated_to_page_size(self):
        assert PAGE_SIZE == 4096
        data = b"1" * 5000
        assert kernfs_buf(data) == b"1" * 4096
        assert len(kernfs_buf(b"x" * 4096)) == 4096
        assert len(kernfs_buf(b"x" * 4095)) == 4095

    def test_nul_after_page_is_invisible(self):
        assert kernfs_buf(b"a" * 4096 + b"\0") == b"a" * 4096

    def test_str_and_bytearray(self):
        assert kernfs_buf("online\n") == b"online\n"
        assert kernfs_buf(bytearray(b"ab\0c")) == b"ab"
        assert kernfs_buf(memoryview(b"xy")) == b"xy"

    def test_non_utf8_passes_through(self):
        assert kernfs_buf(b"\xff\xfe\x80\n") == b"\xff\xfe\x80\n"


# --------------------------------------------------------------- sysfs_streq

class TestSysfsStreq:
    @pytest.mark.parametrize("buf", [b"online", b"online\n", "online", "online\n"])
    def test_matches(self, buf):
        assert sysfs_streq(buf, "online")

    @pytest.mark.parametrize(
        "buf",
        [b"online\n\n", b" online", b"Online", b"ONLINE", b"online ", b"onlin",
         b"online_", b"\nonline", b"online\r\n", b"online\t", b"", b"\n", b"online\nx"],
    )
    def test_rejects(self, buf):
        assert not sysfs_streq(buf, "online")

    def test_newline_on_either_side(self):
        assert sysfs_streq(b"online", "online\n")
        assert sysfs_streq(b"online\n", "online\n")
        # one extra "\n" relative to the other side, as in lib/string.c
        assert sysfs_streq(b"online\n\n", "online\n")
        assert not sysfs_streq(b"online\n\n\n", "online\n")
        assert not sysfs_streq(b"online", "online\n\n")

    def test_empty_strings(self):
        assert sysfs_streq(b"", "")
        assert sysfs_streq(b"\n", "")
        assert sysfs_streq(b"", "\n")
        assert not sysfs_streq(b"\n\n", "")

    def test_stops_at_nul(self):
        assert sysfs_streq(b"online\0junk", "online")
        assert sysfs_streq(b"online\n\0junk", "online")
        assert not sysfs_streq(b"\0online", "online")

    def test_case_sensitive(self):
        assert not sysfs_streq(b"Offline", "offline")

    def test_non_utf8(self):
        assert not sysfs_streq(b"\xffonline", "online")
        assert sysfs_streq(b"\xff\n", b"\xff")


class TestSysfsMatchString:
    def test_index(self):
        for i, name in enumerate(ONLINE_TYPES):
            assert sysfs_match_string(ONLINE_TYPES, name) == i
            assert sysfs_match_string(ONLINE_TYPES, (name + "\n").encode()) == i

    @pytest.mark.parametrize(
        "buf", [b"garbage\n", b"\n", b"", b"ONLINE\n", b" online\n", b"going-offline\n", b"online\n\n"]
    )
    def test_no_match(self, buf):
        assert sysfs_match_string(ONLINE_TYPES, buf) == -1

    def test_first_match_wins(self):
        assert sysfs_match_string(["a", "b", "a"], b"a\n") == 0

    def test_none_terminates(self):
        assert sysfs_match_string(["a", None, "b"], b"b") == -1

    def test_policy_names(self):
        policies = ["contig-zones", "auto-movable"]
        assert sysfs_match_string(policies, b"auto-movable\n") == 1
        assert sysfs_match_string(policies, b"contig-zones\n") == 0
        assert sysfs_match_string(policies, b"garbage\n") == -1


# ---------------------------------------------------------------- kstrtobool

class TestKstrtobool:
    def test_alphabet_constants(self):
        assert KSTRTOBOOL_BASIC == "5.12"
        assert KSTRTOBOOL_TF == "6.6"
        assert KSTRTOBOOL_ED == "6.19"
        assert isinstance(KSTRTOBOOL_TF, KstrtoboolAlphabet)

    @pytest.mark.parametrize("alpha", ALPHABETS)
    @pytest.mark.parametrize(
        "buf", [b"y", b"Y", b"1", b"yes", b"1junk", b"Yabc", b"1\n", b"on", b"ON", b"oN", b"On\n", b"onx"]
    )
    def test_true_everywhere(self, alpha, buf):
        assert kstrtobool(buf, alpha) is True

    @pytest.mark.parametrize("alpha", ALPHABETS)
    @pytest.mark.parametrize(
        "buf", [b"n", b"N", b"0", b"no", b"0junk", b"0\n", b"off", b"OFF", b"of", b"oF", b"Of\n"]
    )
    def test_false_everywhere(self, alpha, buf):
        assert kstrtobool(buf, alpha) is False

    @pytest.mark.parametrize("alpha", ALPHABETS)
    @pytest.mark.parametrize(
        "buf", [b"", b"\n", b"o", b"O", b"o\n", b"ox", b"2", b"maybe", b" 1", b"\t1", b"-1", b"+1",
                b"\0" b"1", b"x", b"\xff", b"\xc3\xa9"]
    )
    def test_einval_everywhere(self, alpha, buf):
        assert errno_of(kstrtobool, buf, alpha) == errno.EINVAL

    @pytest.mark.parametrize("buf,val", [(b"t", True), (b"T", True), (b"true", True), (b"TRUE\n", True),
                                         (b"f", False), (b"F", False), (b"false", False), (b"FALSE\n", False)])
    def test_tf(self, buf, val):
        assert errno_of(kstrtobool, buf, KSTRTOBOOL_BASIC) == errno.EINVAL
        assert kstrtobool(buf, KSTRTOBOOL_TF) is val
        assert kstrtobool(buf, KSTRTOBOOL_ED) is val

    @pytest.mark.parametrize("buf,val", [(b"e", True), (b"E", True), (b"enable", True), (b"enabled\n", True),
                                         (b"d", False), (b"D", False), (b"disable", False), (b"disabled\n", False)])
    def test_ed(self, buf, val):
        assert errno_of(kstrtobool, buf, KSTRTOBOOL_BASIC) == errno.EINVAL
        assert errno_of(kstrtobool, buf, KSTRTOBOOL_TF) == errno.EINVAL
        assert kstrtobool(buf, KSTRTOBOOL_ED) is val

    def test_only_first_chars_matter(self):
        assert kstrtobool(b"yesterday", KSTRTOBOOL_BASIC) is True
        assert kstrtobool(b"nonsense", KSTRTOBOOL_BASIC) is False
        assert kstrtobool(b"onion", KSTRTOBOOL_BASIC) is True
        assert kstrtobool(b"offer", KSTRTOBOOL_BASIC) is False

    def test_nul_terminates(self):
        assert errno_of(kstrtobool, b"o\0n", KSTRTOBOOL_BASIC) == errno.EINVAL
        assert kstrtobool(b"on\0", KSTRTOBOOL_BASIC) is True

    def test_str_input(self):
        assert kstrtobool("yes\n", KSTRTOBOOL_BASIC) is True

    def test_trace_online_values(self):
        # trace a/b, P3: yes/on/1 online, off/0 offline, 2 EINVAL (6.1 kernel)
        for alpha in ALPHABETS:
            assert kstrtobool(b"yes\n", alpha) is True
            assert kstrtobool(b"on\n", alpha) is True
            assert kstrtobool(b"1\n", alpha) is True
            assert kstrtobool(b"off\n", alpha) is False
            assert kstrtobool(b"0\n", alpha) is False
            assert errno_of(kstrtobool, b"2\n", alpha) == errno.EINVAL
            # auto_movable_numa_aware: maybe EINVAL, N/Y accepted
            assert errno_of(kstrtobool, b"maybe\n", alpha) == errno.EINVAL
            assert kstrtobool(b"N\n", alpha) is False
            assert kstrtobool(b"Y\n", alpha) is True

    def test_version_strings(self):
        assert kstrtobool_alphabet_for("5.12") is KSTRTOBOOL_BASIC
        assert kstrtobool_alphabet_for("5.13") is KSTRTOBOOL_BASIC
        assert kstrtobool_alphabet_for("5.15") is KSTRTOBOOL_BASIC
        assert kstrtobool_alphabet_for("5.18") is KSTRTOBOOL_BASIC
        assert kstrtobool_alphabet_for("5.19") is KSTRTOBOOL_TF
        assert kstrtobool_alphabet_for("6.1") is KSTRTOBOOL_TF  # the traced kernel
        assert kstrtobool_alphabet_for("6.6") is KSTRTOBOOL_TF
        assert kstrtobool_alphabet_for("6.8+") is KSTRTOBOOL_TF
        assert kstrtobool_alphabet_for("6.12") is KSTRTOBOOL_TF
        assert kstrtobool_alphabet_for("6.19") is KSTRTOBOOL_ED
        assert kstrtobool_alphabet_for("7.0-vendor") is KSTRTOBOOL_ED
        assert kstrtobool_alphabet_for(KSTRTOBOOL_TF) is KSTRTOBOOL_TF
        assert kstrtobool(b"t", "6.6") is True
        assert errno_of(kstrtobool, b"t", "5.13") == errno.EINVAL
        with pytest.raises(ValueError):
            kstrtobool_alphabet_for("latest")

    def test_profile_module_names(self):
        # memfs.machine.profiles spells the alphabets "basic", "tf", "ed"
        assert kstrtobool_alphabet_for("basic") is KSTRTOBOOL_BASIC
        assert kstrtobool_alphabet_for("tf") is KSTRTOBOOL_TF
        assert kstrtobool_alphabet_for("ED") is KSTRTOBOOL_ED
        assert kstrtobool(b"true\n", "tf") is True
        assert errno_of(kstrtobool, b"true\n", "basic") == errno.EINVAL


# ----------------------------------------------------------------- kstrtoull

class TestKstrtoull:
    @pytest.mark.parametrize(
        "buf,val",
        [
            (b"0", 0), (b"1", 1), (b"301", 301), (b"301\n", 301), (b"+301", 301), (b"+0", 0),
            (b"0x10", 16), (b"0X10", 16), (b"0xff", 255), (b"0xFF\n", 255), (b"0xaBc", 0xABC),
            (b"010", 8), (b"0777", 511), (b"00", 0), (b"0\n", 0),
            (b"4294967296", 1 << 32),
            (b"18446744073709551615", U64_MAX),
            (b"0xffffffffffffffff", U64_MAX),
            (b"01777777777777777777777", U64_MAX),
            (b"000000000000000000000000000001", 1),
            (b"0x0000000000000000000000000001", 1),
            (b"4294967296\0junk", 1 << 32),
        ],
    )
    def test_values(self, buf, val):
        assert kstrtoull(buf) == val

    @pytest.mark.parametrize(
        "buf",
        [
            b"", b"\n", b"+", b"-1", b"-0", b"++1", b"+-1", b" 1", b"1 ", b"1\n\n", b"1\r\n", b"\t1",
            b"abc", b"12abc", b"1.0", b"1e3", b"08", b"09", b"0x", b"0X", b"0x\n", b"0xg", b"0b101",
            b"x10", b"\0" b"1", b"1\n1", b"\xff", b"1\xff", b"\xef\xbc\x91",  # fullwidth digit one
        ],
    )
    def test_einval(self, buf):
        assert errno_of(kstrtoull, buf) == errno.EINVAL

    @pytest.mark.parametrize(
        "buf",
        [b"18446744073709551616", b"0x10000000000000000", b"02000000000000000000000",
         b"99999999999999999999999999", b"18446744073709551616\n",
         b"18446744073709551616junk",  # overflow is reported before trailing junk
         b"+18446744073709551616"],
    )
    def test_erange(self, buf):
        assert errno_of(kstrtoull, buf) == errno.ERANGE

    def test_explicit_bases(self):
        assert kstrtoull(b"ff", 16) == 255
        assert kstrtoull(b"0xff", 16) == 255
        assert errno_of(kstrtoull, b"0x", 16) == errno.EINVAL
        assert kstrtoull(b"010", 10) == 10
        assert errno_of(kstrtoull, b"0x10", 10) == errno.EINVAL
        assert kstrtoull(b"17", 8) == 15
        assert errno_of(kstrtoull, b"8", 8) == errno.EINVAL
        with pytest.raises(ValueError):
            kstrtoull(b"1", 37)

    def test_str_input(self):
        assert kstrtoull("0x8000000\n") == 0x8000000


class TestKstrtouint:
    def test_values(self):
        assert kstrtouint(b"301\n") == 301
        assert kstrtouint(b"0\n") == 0
        assert kstrtouint(b"4294967295") == U32_MAX
        assert kstrtouint(b"0xffffffff") == U32_MAX

    def test_erange(self):
        assert errno_of(kstrtouint, b"4294967296") == errno.ERANGE
        assert errno_of(kstrtouint, b"18446744073709551616") == errno.ERANGE

    @pytest.mark.parametrize("buf", [b"-1\n", b"-0", b"abc\n", b"", b"\n", b"1 2", b" 1"])
    def test_einval(self, buf):
        # trace a/b P4: `abc` and `-1` > auto_movable_ratio give EINVAL (param_set_uint)
        assert errno_of(kstrtouint, buf) == errno.EINVAL


class TestKstrtollInt:
    @pytest.mark.parametrize(
        "buf,val",
        [(b"-1", -1), (b"-1\n", -1), (b"-0", 0), (b"+5", 5), (b"-0x10", -16), (b"-010", -8),
         (b"9223372036854775807", S64_MAX), (b"-9223372036854775808", S64_MIN)],
    )
    def test_ll_values(self, buf, val):
        assert kstrtoll(buf) == val

    @pytest.mark.parametrize("buf", [b"9223372036854775808", b"-9223372036854775809",
                                     b"-18446744073709551615", b"-18446744073709551616"])
    def test_ll_erange(self, buf):
        assert errno_of(kstrtoll, buf) == errno.ERANGE

    @pytest.mark.parametrize("buf", [b"-", b"--1", b"-+1", b"+-1", b"- 1", b"", b"-\n"])
    def test_ll_einval(self, buf):
        assert errno_of(kstrtoll, buf) == errno.EINVAL

    def test_int(self):
        assert kstrtoint(b"-1\n") == -1
        assert kstrtoint(b"2147483647") == S32_MAX
        assert kstrtoint(b"-2147483648") == S32_MIN
        assert errno_of(kstrtoint, b"2147483648") == errno.ERANGE
        assert errno_of(kstrtoint, b"-2147483649") == errno.ERANGE
        assert errno_of(kstrtoint, b"4294967295") == errno.ERANGE
        assert errno_of(kstrtoint, b"abc") == errno.EINVAL
        assert errno_of(kstrtoint, b"-+1") == errno.EINVAL


# --------------------------------------------------------- property tests

PARSERS = [
    lambda b: kstrtoull(b),
    lambda b: kstrtoull(b, 16),
    lambda b: kstrtoll(b),
    lambda b: kstrtouint(b),
    lambda b: kstrtoint(b),
    lambda b: kstrtobool(b, KSTRTOBOOL_BASIC),
    lambda b: kstrtobool(b, KSTRTOBOOL_TF),
    lambda b: kstrtobool(b, KSTRTOBOOL_ED),
    lambda b: sysfs_streq(b, "online"),
    lambda b: sysfs_match_string(ONLINE_TYPES, b),
]

# bytes biased towards the characters the parsers care about
interesting = st.lists(
    st.sampled_from(list(b"0123456789abcdefxXoOnNyYtTfFeEdD+-\n\0 \xff\x80")) | st.integers(0, 255),
    max_size=40,
).map(bytes)
any_bytes = st.binary(max_size=64) | interesting


@settings(max_examples=400, deadline=None)
@given(any_bytes)
def test_arbitrary_bytes_only_raise_einval_or_erange(data):
    buf = kernfs_buf(data)
    for parse in PARSERS:
        try:
            parse(buf)
        except OSError as e:
            assert type(e) is OSError
            assert e.errno in (errno.EINVAL, errno.ERANGE)
        # raw data (embedded NULs, > page) must behave the same
        try:
            r1 = ("ok", parse(data))
        except OSError as e:
            r1 = ("err", e.errno)
        try:
            r2 = ("ok", parse(data.split(b"\0", 1)[0]))
        except OSError as e:
            r2 = ("err", e.errno)
        assert r1 == r2


@settings(max_examples=300, deadline=None)
@given(st.integers(0, U64_MAX), st.sampled_from(["%d", "%#x", "%#X", "%#o", "+%d", "%d\n", "%#x\n"]))
def test_kstrtoull_roundtrip(n, fmt):
    s = (fmt % n).encode()
    if fmt.startswith("%#o"):
        s = s.replace(b"0o", b"0")
    assert kstrtoull(s) == n


@settings(max_examples=200, deadline=None)
@given(st.integers(U64_MAX + 1, U64_MAX * 1000))
def test_kstrtoull_overflow(n):
    assert errno_of(kstrtoull, str(n).encode()) == errno.ERANGE
    assert errno_of(kstrtoull, hex(n).encode()) == errno.ERANGE


@settings(max_examples=300, deadline=None)
@given(st.integers(S64_MIN - 10, S64_MAX + 10))
def test_kstrtoll_range(n):
    s = str(n).encode()
    if S64_MIN <= n <= S64_MAX:
        assert kstrtoll(s) == n
    else:
        assert errno_of(kstrtoll, s) == errno.ERANGE


@settings(max_examples=300, deadline=None)
@given(st.integers(-(1 << 33), 1 << 33))
def test_kstrtouint_kstrtoint_range(n):
    s = str(n).encode()
    if n < 0:
        assert errno_of(kstrtouint, s) == errno.EINVAL
    elif n > U32_MAX:
        assert errno_of(kstrtouint, s) == errno.ERANGE
    else:
        assert kstrtouint(s) == n
    if S32_MIN <= n <= S32_MAX:
        assert kstrtoint(s) == n
    else:
        assert errno_of(kstrtoint, s) == errno.ERANGE


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20), st.text(max_size=20))
def test_sysfs_streq_model(a, b):
    ba = a.encode().split(b"\0")[0]
    bb = b.encode().split(b"\0")[0]
    expected = ba == bb or ba == bb + b"\n" or bb == ba + b"\n"
    assert sysfs_streq(a, b) is expected
    assert sysfs_streq(a.encode(), b) is expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=8))
def test_kstrtobool_alphabets_nest(data):
    """Each newer alphabet only adds accepted strings, never changes a result."""
    results = []
    for alpha in ALPHABETS:
        try:
            results.append(kstrtobool(data, alpha))
        except OSError as e:
            assert e.errno == errno.EINVAL
            results.append(None)
    for older, newer in zip(results, results[1:]):
        if older is not None:
            assert newer == older

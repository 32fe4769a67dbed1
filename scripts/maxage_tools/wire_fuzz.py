"""The wire fuzzer's grammar: what it sends. Gen draws every command from one seeded Random
(the same seed gives the same commands against the same replies): CLIENT KILL / MAXAGE.KILL
filters with every keyword and its NOT- form, valid and mutated values (NUL, invalid UTF-8,
CR/LF, U+0100, huge and negative numbers), CONFIG SET of every maxage.* setting, module
arguments, MAXAGE.SELF and ACL rules. The runner (servers, checks, failures, replay, the command
line) is wire_fuzz_runner.py.
"""

# The control connection's name, which generated filters name too (NOT-NAME fuzz-control).
CONTROL_NAME = b"fuzz-control"

# Values ------------------------------------------------------------------------------------

CLIENT_TYPES = [b"normal", b"master", b"primary", b"replica", b"slave", b"pubsub"]
TYPE_JUNK = [b"monitor", b"NORMAL", b"Pubsub", b"no-evict", b"all", b"", b"normal ", b"nor"]
FLAG_LETTERS = b"ANMSOPxbtRrUcuTIedf"
USERS = [b"default", b"fuzzuser", b"fuzzro", b"nosuchuser"]
PASSWORD = b"fuzzpw"
LIB_NAMES = [b"redis-py", b"fuzzlib", b"go-redis", b"lettuce"]
LIB_VERS = [b"1.0", b"5.0.1", b"0"]
NAMES = [b"web-1", b"web-2", b"batch", b"monitoring-1", b"sentinel-a", CONTROL_NAME]
CHANNELS = [b"ch", b"news", b"__redis__:invalidate", b"a*"]
KEYS = [b"k1", b"k2", b"k3", b"user:1"]

SPECIAL_NUMBERS = [
    b"0",
    b"1",
    b"-1",
    b"-0",
    b"+1",
    b"007",
    b"18446744073709552",
    b"9223372036854775808",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"-9223372036854775809",
    b"18446744073709551615",
    b"18446744073709551616",
    b"99999999999999999999999999",
    b"315360000000",
    b"315360000001",
    b"4294967296",
    b"2147483648",
    b"1e3",
    b"0x10",
    b"1.5",
    b" 1",
    b"1 ",
    b"nan",
    b"inf",
    b"",
]


def _nul_char(rng):
    """A character whose code point is a multiple of 256 (its low byte is NUL)."""
    return chr(rng.choice([0x100, 0x200, 0x4E00, 0xFF00, 0x10000, 0x1F600])).encode()


SPECIAL_STRINGS = [
    b"",
    b"\x00",
    b"x\x00",
    b"\x00x",
    "Ā".encode(),
    "一".encode(),
    "ĀĀĀ".encode(),
    "é".encode(),
    "日本".encode(),
    b"\r\n",
    b"\n",
    b"\r",
    b"a b",
    b"\xff",
    b"\xc4",
    b"\xe4\xb8",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"*",
    b"?",
    b"[",
    b"[a-",
    b"[^]",
    b"\\",
    b"*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?x",
    b"%s%n%x",
    b"'",
    b'"',
    b"=",
    b":",
    b"=1",
    b"user:",
    b"type:",
    b"a" * 300,
    b"\x7f\x1b[31m",
]


# The maxage.* settings and their useful ranges (the module's own bounds are wider).
CONFIG_NUMERIC = {
    b"max-age-ms": (50, 2000),
    b"jitter-pct": (0, 100),
    b"max-evictions-per-sec": (0, 5000),
    b"min-evictions-per-sec": (0, 1000),
    b"max-overdue-ms": (0, 60000),
    b"grace-ms": (0, 5000),
    b"notice-lead-ms": (0, 2000),
}
CONFIG_ENUMS = {
    b"client-kill-compat": [b"yes", b"no"],
    b"mode": [b"enforce", b"observe"],
    b"pacing": [b"fixed", b"adaptive"],
}
CONFIG_STRINGS = (b"exempt-types", b"exempt-users", b"exempt-names", b"rules")
CONFIG_NAMES = tuple(CONFIG_NUMERIC) + tuple(CONFIG_ENUMS) + CONFIG_STRINGS


class Sanitizer:
    """For exploring past the known NUL-in-error-text crash on builds that still have it
    (--avoid-known-crashers): drops NUL bytes and characters whose code point is a multiple of
    256 from generated arguments. Off by default."""

    def __init__(self, enabled):
        self.enabled = enabled

    def __call__(self, argv):
        if not self.enabled:
            return argv
        out = []
        for arg in argv:
            arg = arg.replace(b"\x00", b"0")
            text = arg.decode("utf-8", "surrogateescape")
            if any(ord(c) >= 0x100 and ord(c) % 256 == 0 for c in text):
                text = "".join("?" if ord(c) >= 0x100 and ord(c) % 256 == 0 else c for c in text)
                arg = text.encode("utf-8", "surrogateescape")
            out.append(arg)
        return out


class Gen:
    """Everything random comes from one seeded Random."""

    def __init__(self, rng):
        self.rng = rng
        self.clients = []  # Parsed CLIENT LIST lines of the main server, refreshed every step.

    def chance(self, p):
        return self.rng.random() < p

    def pick(self, seq):
        return self.rng.choice(seq)

    def random_bytes(self, max_len=16):
        n = self.rng.randint(0, max_len)
        return bytes(self.rng.getrandbits(8) for _ in range(n))

    def mutate(self, value):
        rng = self.rng
        op = rng.randrange(9)
        if op == 0 and value:
            i = rng.randrange(len(value))
            return value[:i] + bytes([rng.getrandbits(8)]) + value[i + 1 :]
        if op == 1:
            i = rng.randint(0, len(value))
            return value[:i] + self.pick(SPECIAL_STRINGS) + value[i:]
        if op == 2:
            return value[: rng.randint(0, len(value))]
        if op == 3:
            return value * rng.randint(2, 5)
        if op == 4:
            return value.swapcase()
        if op == 5:
            return value + b"\x00"
        if op == 6:
            i = rng.randint(0, len(value))
            return value[:i] + _nul_char(rng) + value[i:]
        if op == 7:
            return b" " + value
        return value + self.pick(SPECIAL_NUMBERS)

    def junk(self):
        r = self.rng.random()
        if r < 0.35:
            return self.pick(SPECIAL_STRINGS)
        if r < 0.6:
            return self.pick(SPECIAL_NUMBERS)
        if r < 0.7:
            return _nul_char(self.rng)
        return self.random_bytes()

    def value(self, valid_values):
        """A valid value most of the time, otherwise a mutated one or junk."""
        r = self.rng.random()
        if valid_values and r < 0.65:
            return self.pick(valid_values)
        if valid_values and r < 0.85:
            return self.mutate(self.pick(valid_values))
        return self.junk()

    def number(self, low, high):
        r = self.rng.random()
        if r < 0.75:
            return str(self.rng.randint(low, high)).encode()
        if r < 0.9:
            return self.pick(SPECIAL_NUMBERS)
        return self.mutate(str(self.rng.randint(low, high)).encode())

    # What the live server has, for valid filter values ----------------------------------------

    def known(self, field):
        values = [c[field] for c in self.clients if c.get(field)]
        return values

    def ids(self):
        return self.known(b"id") or [b"1"]

    # Filters --------------------------------------------------------------------------------

    def filter_value(self, keyword):
        base = keyword[4:] if keyword.startswith(b"NOT-") else keyword
        if base == b"ID":
            n = 1 if self.chance(0.6) else self.rng.randint(2, 6)
            return [self.value(self.ids() + [b"0", b"999999"]) for _ in range(n)]
        if base == b"TYPE":
            return [self.value(CLIENT_TYPES) if self.chance(0.85) else self.pick(TYPE_JUNK)]
        if base == b"USER":
            return [self.value(USERS[:3] if self.chance(0.8) else USERS)]
        if base in (b"ADDR", b"LADDR"):
            field = b"addr" if base == b"ADDR" else b"laddr"
            return [self.value(self.known(field) + [b"127.0.0.1:1", b"[::1]:6379"])]
        if base == b"IP":
            return [self.value([b"127.0.0.1", b"::1", b"10.0.0.1"])]
        if base == b"NAME":
            return [self.value(self.known(b"name") + NAMES)]
        if base == b"LIB-NAME":
            return [self.value(LIB_NAMES)]
        if base == b"LIB-VER":
            return [self.value(LIB_VERS)]
        if base == b"FLAGS":
            n = self.rng.randint(1, 3)
            letters = bytes(self.pick(FLAG_LETTERS) for _ in range(n))
            return [self.value([letters, b"N", b"x", b"P"])]
        if base == b"CAPA":
            return [self.value([b"r", b"redirect", b"R"])]
        if base == b"DB":
            return [self.number(0, 16)]
        if base in (b"MAXAGE", b"IDLE"):
            return [self.number(0, 3)]
        if base == b"MAXAGE-MS":
            return [self.number(0, 3000)]
        if base == b"SKIPME":
            return [self.value([b"yes", b"no", b"YES"])]
        if base == b"LIMIT":
            return [self.number(0, 10)]
        if base == b"PERCENT":
            return [self.number(0, 101)]
        if base in (b"DRYRUN", b"GRACEFUL"):
            return []
        return [self.junk()]

    FILTER_KEYWORDS = (
        b"ID",
        b"NOT-ID",
        b"TYPE",
        b"NOT-TYPE",
        b"USER",
        b"NOT-USER",
        b"ADDR",
        b"NOT-ADDR",
        b"LADDR",
        b"NOT-LADDR",
        b"IP",
        b"NOT-IP",
        b"NAME",
        b"NOT-NAME",
        b"LIB-NAME",
        b"NOT-LIB-NAME",
        b"LIB-VER",
        b"NOT-LIB-VER",
        b"FLAGS",
        b"NOT-FLAGS",
        b"CAPA",
        b"NOT-CAPA",
        b"DB",
        b"NOT-DB",
        b"MAXAGE",
        b"MAXAGE-MS",
        b"IDLE",
        b"SKIPME",
        b"LIMIT",
        b"DRYRUN",
        b"GRACEFUL",
        b"PERCENT",
    )

    def keyword(self, keyword):
        r = self.rng.random()
        if r < 0.8:
            return keyword
        if r < 0.9:
            return keyword.lower()
        if r < 0.95:
            return bytes(
                c ^ 0x20 if 65 <= c <= 90 and self.chance(0.5) else c for c in keyword.upper()
            )
        return self.mutate(keyword)

    def filters(self, allow_list=False):
        rng = self.rng
        out = []
        n = rng.choice([0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 8])
        for _ in range(n):
            keyword = self.pick(self.FILTER_KEYWORDS)
            out.append(self.keyword(keyword))
            values = self.filter_value(keyword)
            if values and self.chance(0.03):
                values = values[:-1]  # A missing value.
            out.extend(values)
        if self.chance(0.05):
            out.append(self.junk())
        # Most kills spare the control connection by name and most are dry runs or limited, so
        # that the server keeps a population of clients; the rest hit whoever matches.
        if not allow_list:
            if self.chance(0.5):
                out += [b"NOT-NAME", CONTROL_NAME]
            if self.chance(0.3):
                out.append(b"DRYRUN")
            elif self.chance(0.3):
                out += [b"LIMIT", str(rng.randint(1, 3)).encode()]
        return out

    def huge_filters(self):
        """Very many arguments: up to 100,000 in one command."""
        rng = self.rng
        n = rng.choice([1000, 5000, 20000, 100000])
        shape = rng.randrange(4)
        if shape == 0:
            ids = self.ids()
            return [b"ID"] + [
                self.pick(ids) if rng.random() < 0.01 else b"%d" % i for i in range(n)
            ]
        if shape == 1:
            return [b"NOT-ID"] + [b"%d" % (i + 100000) for i in range(n)] + [b"DRYRUN"]
        if shape == 2:
            pair = [b"NOT-NAME", self.value(NAMES)]
            return pair * (n // 2) + [b"DRYRUN"]
        return [b"MAXAGE-MS", b"1"] * (n // 2 - 1) + [b"DRYRUN", b"LIMIT", b"1"]

    # Rules and config values ------------------------------------------------------------------

    def glob(self):
        return self.value([b"*", b"web-*", b"monitoring-*", b"fuzz*", b"?", b"[ab]*", b"batch"])

    def rule(self):
        selector = self.pick([b"user:", b"name:", b"lib:", b"type:"])
        if selector == b"type:":
            target = self.value([b"normal", b"pubsub", b"master", b"replica"])
        else:
            target = self.glob()
        ms = self.number(0, 3000) if self.chance(0.9) else self.pick(SPECIAL_NUMBERS)
        sep = b"=" if self.chance(0.95) else self.pick([b"", b"==", b":", b" = "])
        return selector + target + sep + ms

    def rules(self):
        if self.chance(0.1):
            return b""
        rules = [self.rule() for _ in range(self.rng.randint(1, 4))]
        joined = b" ".join(rules)
        return joined if self.chance(0.85) else self.mutate(joined)

    def exempt_types(self):
        words = [b"master", b"replica", b"primary", b"slave", b"pubsub", b"normal", b"monitor"]
        chosen = [w for w in words if self.chance(0.3)]
        if self.chance(0.75):
            chosen.append(b"no-evict")
        self.rng.shuffle(chosen)
        joined = b" ".join(chosen)
        return joined if self.chance(0.85) else self.mutate(joined)

    def patterns(self):
        joined = b" ".join(self.glob() for _ in range(self.rng.randint(0, 3)))
        return joined if self.chance(0.9) else self.mutate(joined)

    def config_value(self, name):
        if name in CONFIG_NUMERIC:
            low, high = CONFIG_NUMERIC[name]
            if name == b"max-age-ms" and self.chance(0.15):
                return self.pick([b"0", b"300000", b"315360000000"])
            return self.number(low, high)
        if name in CONFIG_ENUMS:
            return self.value(CONFIG_ENUMS[name] + [b"YES", b"Adaptive"])
        if name == b"rules":
            return self.rules()
        if name == b"exempt-types":
            return self.exempt_types()
        return self.patterns()

    def config_set(self):
        pairs = 1 if self.chance(0.85) else self.rng.randint(2, 3)
        argv = [b"CONFIG", b"SET"]
        for _ in range(pairs):
            name = self.pick(CONFIG_NAMES)
            full = b"maxage." + name if self.chance(0.97) else self.mutate(b"maxage." + name)
            argv += [full, self.config_value(name)]
        return argv

    def module_args(self):
        """MODULE LOAD arguments: mostly valid pairs, sometimes refused ones."""
        argv = []
        for _ in range(self.rng.randint(0, 3)):
            name = self.pick(CONFIG_NAMES)
            prefix = b"maxage." if self.chance(0.3) else b""
            argv += [prefix + name, self.config_value(name)]
        if self.chance(0.15):
            argv.append(self.junk())
        return argv

    def valid_module_args(self):
        """Arguments that must load: a small max age half the time, enforcement otherwise off."""
        if self.chance(0.5):
            return [b"max-age-ms", str(self.rng.randint(100, 2000)).encode()]
        return []

    def preview(self):
        argv = [b"MAXAGE.PREVIEW"]
        parts = [
            [b"RULES", self.rules()],
            [b"MAX-AGE-MS", self.number(0, 5000)],
            [b"WITHIN", self.number(0, 60000)],
        ]
        self.rng.shuffle(parts)
        for part in parts:
            if self.chance(0.5):
                argv += [self.keyword(part[0])] + part[1:]
        if self.chance(0.08):
            argv.append(self.junk())
        if len(argv) > 1 and self.chance(0.05):
            argv = argv[:-1]
        return argv

    def self_request(self):
        """MAXAGE.SELF: nothing, a max age (small ones so that they fall due), junk, too many;
        a third of the time the notice commands instead (MAXAGE.NOTICE with its words or junk,
        the tracking it needs, MAXAGE.NOTICEKEY with any key)."""
        if self.chance(1 / 3):
            return self.pick(
                [
                    [b"MAXAGE.NOTICE"],
                    [b"MAXAGE.NOTICE", self.value([b"ON", b"off", b"On"])],
                    [b"MAXAGE.NOTICE", self.junk()],
                    [b"MAXAGE.NOTICE", b"ON", self.junk()],
                    [b"CLIENT", b"TRACKING", b"ON", b"OPTIN"],
                    [b"CLIENT", b"CACHING", b"YES"],
                    [b"HELLO", self.value([b"3", b"2"])],
                    [b"MAXAGE.NOTICEKEY", self.junk()],
                    [b"MAXAGE.NOTICEKEY"],
                    [b"MAXAGE.NOTICEKEY", self.junk(), self.junk()],
                ]
            )
        r = self.rng.random()
        if r < 0.25:
            return [b"MAXAGE.SELF"]
        if r < 0.7:
            return [b"MAXAGE.SELF", self.number(0, 3000)]
        if r < 0.9:
            return [b"MAXAGE.SELF", self.junk()]
        return [b"MAXAGE.SELF", self.junk(), self.junk()]

    def kill_command(self):
        r = self.rng.random()
        if r < 0.45:
            return [b"MAXAGE.KILL"] + self.filters()
        if r < 0.6:
            return [b"MAXAGE.CLIENTKILL", b"KILL"] + self.filters()
        if r < 0.62:
            return [b"MAXAGE.CLIENTKILL"] + ([self.junk()] if self.chance(0.5) else [])
        if r < 0.9:
            return [b"CLIENT", self.keyword(b"KILL")] + self.filters()
        # The old form: CLIENT KILL ip:port.
        addrs = self.known(b"addr") or [b"127.0.0.1:1"]
        argv = [b"CLIENT", b"KILL", self.value(addrs)]
        if self.chance(0.1):
            argv.append(self.junk())
        return argv

    def acl_rules(self):
        return self.pick(
            [
                [b"+@all"],
                [b"+@all", b"-maxage.kill", b"-maxage.list"],
                [b"+client|kill", b"+maxage.clientkill", b"+ping"],
                [b"+client|kill", b"+ping"],
                [b"+maxage.clientkill", b"+ping"],
                [b"+@read", b"+maxage.list", b"+maxage.preview", b"+config|get"],
                [b"-@all", b"+auth", b"+hello"],
                [b"+@all", b"-client", b"-config"],
                [b"+@all", b"-@admin"],
                [self.junk()],
            ]
        )

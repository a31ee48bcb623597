"""Secrets in prompts: find them, redact them from anything kept, or refuse the request.

Detectors are the documented formats of each credential (AWS access key ids `AKIA…`/`ASIA…`,
Google API keys `AIza…` and OAuth tokens `ya29.`, Azure storage `AccountKey=` and SAS `sig=`,
GitHub `ghp_`/`github_pat_`, Slack `xox?-` and webhooks, PEM/OpenSSH private key blocks
(RFC 7468), JWTs (RFC 7519: three base64url parts, the first two JSON beginning `{"`), passwords
in URLs (RFC 3986 userinfo) and in assignments), plus a Shannon-entropy detector for the rest:
a base64-alphabet token of ≥ 24 characters mixing upper case, lower case and digits whose
entropy is ≥ 4.5 bits per character. The 4.5-bit threshold is truffleHog's for base64 strings;
a random 32-character base64 token scores ≈ 4.7–5.0, English identifiers ≈ 3–4.
Hex strings (hashes, UUIDs, commit ids) are not flagged by entropy alone: they are everywhere
in code and are rarely secrets unless assigned to a secret-named variable, which the assignment
detector catches.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from ..errors import CodemoatError


class SecretInPrompt(CodemoatError):
    """`policy.secrets = "block"` and the prompt holds a secret."""

    status = 400
    code = "secret_detected"


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int

    def line(self, text: str) -> int:
        return text.count("\n", 0, self.start) + 1


# Names that make an assigned string a secret (matched inside the key, case-insensitive).
_SECRET_NAME = re.compile(
    r"(?i)pass(?:word|wd|phrase)?|pwd|secret|api[_-]?key|apikey|access[_-]?key|auth[_-]?token|access[_-]?token|private[_-]?key|token"
)
# Every quantifier over text is bounded, and runs start only at a boundary, so that scanning is
# linear in the prompt's length even for adversarial input (one long line of letters, say).
# (kind, pattern, group holding the secret: 0 = the whole match)
_PATTERNS: list[tuple[str, re.Pattern[str], int]] = [
    (
        "private_key",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY(?: BLOCK)?-----(?:.*?-----END (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY(?: BLOCK)?-----|.*\Z)",
            re.S,
        ),
        0,
    ),
    ("aws_access_key_id", re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|AROA|AIDA)[0-9A-Z]{16}\b"), 0),
    (
        "aws_secret_access_key",
        re.compile(r"(?i)aws.{0,20}?(?:secret|key).{0,20}?[=:]\s{0,8}[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"),
        1,
    ),
    ("gcp_api_key", re.compile(r"\bAIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])"), 0),
    ("gcp_oauth_token", re.compile(r"\bya29\.[0-9A-Za-z_\-]{20,2048}"), 0),
    ("gcp_client_secret", re.compile(r"\bGOCSPX-[0-9A-Za-z_\-]{28}"), 0),
    ("azure_storage_key", re.compile(r"(?i)AccountKey=([A-Za-z0-9+/]{86}==)"), 1),
    ("azure_sas_signature", re.compile(r"[?&]sig=([A-Za-z0-9%+/]{40,256}(?:%3D|=){0,2})"), 1),
    (
        "azure_client_secret",
        re.compile(r"(?<![A-Za-z0-9_~.-])[A-Za-z0-9_~.-]{3}\dQ~[A-Za-z0-9_~.-]{31,34}(?![A-Za-z0-9_~.-])"),
        0,
    ),
    ("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{60,255})"), 0),
    ("slack_token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,255}"), 0),
    ("slack_webhook", re.compile(r"https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9/_-]{20,255}"), 0),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{8,4096}\.eyJ[A-Za-z0-9_-]{8,8192}\.[A-Za-z0-9_-]{16,1024}"), 0),
    ("url_password", re.compile(r"(?<![A-Za-z0-9+.-])[a-zA-Z][a-zA-Z0-9+.-]{0,31}://[^\s/:@\"']{1,256}:([^\s@/\"']{1,256})@"), 1),
    # password = "…", "api_key": "…", token: '…'  (a string literal assigned to a key whose name says secret)
    (
        "assigned_secret",
        re.compile(
            r"(?<![A-Za-z0-9_.-])[\"']?([A-Za-z0-9_.-]{1,64}+)[\"']?\s{0,8}(?::=|=>|[:=])\s{0,8}[rbf]?([\"'])([^\"'\n]{4,512}+)\2"
        ),
        3,
    ),
    # DB_PASSWORD=hunter2 (dotenv / shell: an unquoted value at the start of a line)
    (
        "assigned_secret",
        re.compile(
            r"(?m)^[ \t]{0,8}(?:export[ \t]{1,8})?([A-Z0-9_]{1,64})[ \t]{0,8}=[ \t]{0,8}(?!\d+\s*$)([^\s\"'#$]{4,512})[ \t]*$"
        ),
        2,
    ),
]
# which group of an assigned_secret pattern holds the key's name
_KEY_GROUP = {id(_PATTERNS[-2][1]): 1, id(_PATTERNS[-1][1]): 1}
_ENV_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|APIKEY|ACCESS_KEY")
# Text each pattern cannot match without (any one of these, in the text as it is, or lower-cased for the
# patterns and names matched regardless of case): most prompts hold none, and `in` finds that in
# microseconds where a pattern that starts with \b or a look-behind has the regex engine try every position
# (~100 µs per 4,000 characters each; the whole screen took ~1.9 ms for a 4,000-character prompt, on the
# event loop). A pattern whose needles are all absent is not run: it could not have matched.
_NEEDLES: dict[int, tuple[bool, tuple[str, ...]]] = {  # id(pattern) -> (lower-cased?, needles)
    id(_PATTERNS[1][1]): (False, ("AKIA", "ASIA", "ABIA", "ACCA", "AROA", "AIDA")),
    id(_PATTERNS[2][1]): (True, ("aws",)),
    id(_PATTERNS[3][1]): (False, ("AIza",)),
    id(_PATTERNS[4][1]): (False, ("ya29.",)),
    id(_PATTERNS[5][1]): (False, ("GOCSPX-",)),
    id(_PATTERNS[6][1]): (True, ("accountkey=",)),
    id(_PATTERNS[7][1]): (False, ("sig=",)),
    id(_PATTERNS[8][1]): (False, ("Q~",)),
    id(_PATTERNS[9][1]): (False, ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    id(_PATTERNS[10][1]): (False, ("xox",)),
    id(_PATTERNS[12][1]): (False, ("eyJ",)),
    id(_PATTERNS[13][1]): (False, ("://",)),
    # a quoted assignment counts only under a name that _SECRET_NAME finds: each of its words holds one of these
    id(_PATTERNS[14][1]): (True, ("pass", "pwd", "secret", "key", "token")),
    id(_PATTERNS[15][1]): (False, ("PASSWORD", "PASSWD", "SECRET", "TOKEN", "API_KEY", "APIKEY", "ACCESS_KEY")),
}
_PLACEHOLDER = re.compile(
    r"(?i)^(?:x+|\*+|\.+|<[^>]*>|\$\{[^}]*\}|\{\{[^}]*\}\}|%s|%\([a-z_]+\)s|changeme|password|secret|your[_-].*|none|null|true|false|test|example|dummy|redacted.*)$"
)
_TOKEN = re.compile(r"[A-Za-z0-9+/_\-]{24,}={0,2}")
ENTROPY_BITS = 4.5


def shannon_entropy(s: str) -> float:
    """Bits per character of `s` under its own character frequencies."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values()) if n else 0.0


def _high_entropy(token: str) -> bool:
    core = token.strip("=")
    if len(core) < 24 or not (re.search(r"[a-z]", core) and re.search(r"[A-Z]", core) and re.search(r"\d", core)):
        return False
    if re.fullmatch(r"[A-Za-z_]+\d*", core):  # identifiers such as someLongCamelCaseName2
        return False
    return shannon_entropy(core) >= ENTROPY_BITS


def _may_match(pat: re.Pattern[str], text: str, lower: str) -> bool:
    """False when `text` lacks every needle of `pat` (`_NEEDLES`), so `pat` cannot match it."""
    need = _NEEDLES.get(id(pat))
    if need is None:
        return True
    within = lower if need[0] else text
    return any(n in within for n in need[1])


def find_secrets(text: str, *, prefilter: bool = True) -> list[Finding]:
    """Every secret found in `text`, as non-overlapping spans sorted by position (`prefilter` off: every
    pattern runs, whatever the text holds; the result is the same, slower)."""
    found: list[Finding] = []
    lower = text.lower()
    for kind, pat, group in _PATTERNS:
        if prefilter and not _may_match(pat, text, lower):
            continue
        for m in pat.finditer(text):
            value = m.group(group)
            if kind == "assigned_secret":
                name = m.group(_KEY_GROUP[id(pat)])
                named = _ENV_NAME.search(name) if pat is _PATTERNS[-1][1] else _SECRET_NAME.search(name)
                if not named or _PLACEHOLDER.match(value.strip()):
                    continue
            found.append(Finding(kind, m.start(group), m.end(group)))
    for m in _TOKEN.finditer(text):
        if _high_entropy(m.group(0)):
            found.append(Finding("high_entropy", m.start(), m.end()))
    # Keep the earliest, longest span where findings overlap; named detectors win over entropy.
    found.sort(key=lambda f: (f.start, -(f.end - f.start), f.kind == "high_entropy"))
    out: list[Finding] = []
    for f in found:
        if out and f.start < out[-1].end:
            prev = out[-1]
            kind = f.kind if prev.kind == "high_entropy" else prev.kind
            out[-1] = Finding(kind, prev.start, max(prev.end, f.end))
            continue
        out.append(f)
    return out


def redact(text: str) -> tuple[str, list[Finding]]:
    """`text` with every secret replaced by `[REDACTED:<kind>]`, and what was found."""
    findings = find_secrets(text)
    if not findings:
        return text, findings
    parts, pos = [], 0
    for f in findings:
        parts.append(text[pos : f.start])
        parts.append(f"[REDACTED:{f.kind}]")
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts), findings


def screen(text: str, policy: str = "redact") -> tuple[str, list[Finding]]:
    """Redacted text and findings; with `policy == "block"` raise `SecretInPrompt` instead when any is found.

    The message names the kinds and lines, never the secret itself."""
    redacted, findings = redact(text)
    if findings and policy == "block":
        where = ", ".join(f"{f.kind} on line {f.line(text)}" for f in findings[:5])
        more = f" and {len(findings) - 5} more" if len(findings) > 5 else ""
        raise SecretInPrompt(
            f"request refused: the prompt contains {len(findings)} secret(s) ({where}{more}); "
            'remove them, or ask the admin to set policy.secrets = "redact"'
        )
    return redacted, findings

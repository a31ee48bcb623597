"""Secret detection: each kind is found and redacted; ordinary code is left alone."""

from __future__ import annotations

import random
import string

import pytest

from codemoat.audit.redact import SecretInPrompt, find_secrets, redact, screen, shannon_entropy

rng = random.Random(7)
A = string.ascii_letters + string.digits


def rand(n: int, alphabet: str = A) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


B64 = string.ascii_letters + string.digits + "+/"
SECRETS = {
    "aws_access_key_id": "AKIA" + rand(16, string.ascii_uppercase + string.digits),
    "gcp_api_key": "AIza" + rand(35),
    "gcp_oauth_token": "ya29." + rand(60),
    "github_token": "ghp_" + rand(36),
    "slack_token": "xoxb-" + rand(10, string.digits) + "-" + rand(24),
    "slack_webhook": "https://hooks.slack.com/services/T"
    + rand(8, string.ascii_uppercase)
    + "/B"
    + rand(8, string.ascii_uppercase)
    + "/"
    + rand(24),
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0." + rand(43),
}


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_token_formats_detected(kind):
    secret = SECRETS[kind]
    text = f"def f():\n    client = Client({secret!r})\n    return client\n"
    out, found = redact(text)
    assert [f.kind for f in found] == [kind]
    assert secret not in out and f"[REDACTED:{kind}]" in out and "def f():" in out


CONTEXTUAL = [
    ("aws_secret_access_key", 'aws_secret_access_key = "{}"', rand(40, B64)),
    (
        "azure_storage_key",
        "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={};EndpointSuffix=core.windows.net",
        rand(86, B64) + "==",
    ),
    ("azure_sas_signature", "https://acme.blob.core.windows.net/c/f?sv=2022-11-02&sp=r&sig={}", rand(44, A) + "%3D"),
    ("url_password", "DATABASE_URL = 'postgresql://app:{}@db.internal:5432/app'", "s3cr3t-Pa55"),
    ("assigned_secret", 'config = {{"password": "{}"}}', "hunter2hunter2"),
    ("assigned_secret", "DB_PASSWORD={}", "correcthorse"),
    ("assigned_secret", "api_key: '{}'", "k-123-abc-def"),
]


@pytest.mark.parametrize("kind,template,secret", CONTEXTUAL)
def test_contextual_secrets_detected(kind, template, secret):
    text = template.format(secret)
    out, found = redact(text)
    assert kind in [f.kind for f in found], found
    assert secret not in out


def test_private_key_block_detected_whole_and_cut_off():
    body = "\n".join(rand(64, B64) for _ in range(5))
    pem = f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"
    out, found = redact(f"KEY = '''{pem}'''\nprint(KEY)\n")
    assert [f.kind for f in found] == ["private_key"] and body.splitlines()[2] not in out and "print(KEY)" in out
    cut = f"x = 1\n-----BEGIN OPENSSH PRIVATE KEY-----\n{body[:100]}"  # a prompt ending mid-key
    out, found = redact(cut)
    assert found[0].kind == "private_key" and body[:40] not in out and out.startswith("x = 1")


def test_high_entropy_string_detected():
    secret = rand(40)
    out, found = redact(f"INTERNAL = {secret!r}\n")
    assert [f.kind for f in found] == ["high_entropy"] and secret not in out
    assert shannon_entropy(secret) > 4.5 > shannon_entropy("getUserAccountSettingsFromDb")


ORDINARY = [
    "password = get_password(user)\ntoken = request.headers['Authorization']\n",
    "password = ''\nsecret = None\napi_key = os.environ['API_KEY']\n",
    'password = "<your password>"\ntoken = "${TOKEN}"\n',
    "commit = 'a3f5c9e1d2b4a6c8e0f1a2b3c4d5e6f7a8b9c0d1'\nuuid = '123e4567-e89b-12d3-a456-426614174000'\n",
    "def getUserAccountSettingsFromDatabase(self):\n    return self.accountSettingsRepository.findByUserId(uid)\n",
    "from django.contrib.auth.hashers import make_password\nurl = 'https://example.com/path?q=1'\n",
    "export PATH=$HOME/bin:$PATH\nTOKEN_TTL_SECONDS=3600\n",
    "import numpy as np\nx = np.arange(10).reshape(2, 5)\n# AKIA is the prefix of AWS access key ids\n",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_code_not_flagged(text):
    assert find_secrets(text) == [], find_secrets(text)


def test_block_policy_refuses_with_clear_message_without_the_secret():
    secret = SECRETS["github_token"]
    text = f"x = 1\ngh = Github({secret!r})\n"
    with pytest.raises(SecretInPrompt) as e:
        screen(text, "block")
    assert e.value.status == 400 and "github_token on line 2" in str(e.value) and secret not in str(e.value)
    out, found = screen(text, "redact")
    assert secret not in out and len(found) == 1
    assert screen("x = 1\n", "block") == ("x = 1\n", [])


@pytest.mark.parametrize(
    "text",
    [
        "a" * 100_000,
        "x_" * 50_000,
        "password" * 10_000 + '="',
        "PASSWORD" * 10_000 + "=",
        "a" * 100_000 + "://",
        '"a"=' * 25_000,
        "-----BEGIN " * 10_000,
        "aws" * 30_000,
    ],
    ids=["letters", "identifier", "password-run", "env-run", "scheme-run", "quotes", "begin-run", "aws-run"],
)
def test_no_catastrophic_backtracking(text):
    """Adversarial prompts scan in linear time. The alarm is a hang detector, not a speed target:
    before the patterns were bounded, 20,000 letters took 85 s, so 100,000 would take about half an hour."""
    import signal

    def hung(*_):
        raise TimeoutError("find_secrets backtracked catastrophically")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        find_secrets(text)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _corpus() -> list[str]:
    """Texts of every shape the screen sees: this repository's own sources and docs (code, config, prose,
    hashes, keys named 'key' and 'token'), each kind of secret in code, in the other case, next to a word
    character, split by a newline, and each detector's needle alone."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = sorted([*root.glob("src/codemoat/**/*.py"), *root.glob("docs/*.md"), *root.glob("deploy/**/*")])
    texts = [f.read_text(errors="replace")[:20_000] for f in files if f.is_file()][:400]
    samples = [*SECRETS.values(), *(t.format(s) for _, t, s in CONTEXTUAL)]
    samples += ["gho_" + rand(36), "github_pat_" + rand(70), "GOCSPX-" + rand(28), "abc7Q~" + rand(32, A + "_~.-")]
    for s in samples:
        texts += [f"x = {s!r}\n", f"X{s}Y", s.lower(), s.upper(), s[: len(s) // 2] + "\n" + s[len(s) // 2 :]]
    texts += ["AKIA", "aws", "AccountKey=", "sig=", "Q~", "ghp_", "xox", "eyJ", "://", "pass", "PASSWORD=", "token: 'x'"]
    return texts


def test_prefilter_changes_no_finding():
    """`find_secrets` skips a pattern whose text lacks all of its needles (`redact._NEEDLES`): on every text of
    the corpus the findings are those of every pattern run (fails if a needle is not implied by its pattern)."""
    corpus = _corpus()
    assert len(corpus) > 300
    differ = [t[:80] for t in corpus if find_secrets(t) != find_secrets(t, prefilter=False)]
    assert differ == []
    assert sum(bool(find_secrets(t)) for t in corpus) > 60  # the corpus does hold secrets the screen finds


def test_every_pattern_but_the_fast_ones_has_needles():
    """A new detector is either given needles or starts with a literal (which the regex engine searches for
    quickly on its own): an unfiltered pattern that starts with \\b or a look-behind costs ~100 µs per 4,000
    characters of every prompt."""
    from codemoat.audit import redact as r

    for kind, pat, _ in r._PATTERNS:
        if id(pat) not in r._NEEDLES:
            assert pat.pattern[:1] not in "\\([" and not pat.pattern.startswith("(?"), kind
